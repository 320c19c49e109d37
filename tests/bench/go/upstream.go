package main

// The mock upstream: OpenAI's /v1/chat/completions with canned answers.
//
//   - stream false: one canned chat completion (with usage);
//   - stream true: `chunks` chunks `interval` apart, each carrying "bench_sent_ns" (the wall clock
//     when it was written), the last with finish_reason "stop", then an optional usage chunk
//     (stream_options.include_usage) and `data: [DONE]`;
//   - stream true and a model starting with "bench-slow": one chunk at once, then one every
//     `slow-interval` for up to ten minutes; GET /bench/open reports how many such streams are
//     open right now (a stream counts as open until its handler sees the client gone).

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

var completionBody = []byte(`{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,` +
	`"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant",` +
	`"content":"Hello! This is a canned answer from the benchmark's mock upstream."},` +
	`"logprobs":null,"finish_reason":"stop"}],` +
	`"usage":{"prompt_tokens":42,"completion_tokens":14,"total_tokens":56}}`)

var modelsBody = []byte(`{"object":"list","data":[{"id":"bench-model","object":"model",` +
	`"created":1700000000,"owned_by":"bench"}]}`)

type chatRequest struct {
	Model         string `json:"model"`
	Stream        bool   `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

type upstream struct {
	chunks       int
	interval     time.Duration
	slowInterval time.Duration
	slowOpen     int64
	slowPeak     int64
	slowStarted  int64
	requests     int64
}

func runUpstream(args []string) {
	fs := flag.NewFlagSet("upstream", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:0", "listen address")
	chunks := fs.Int("chunks", 16, "chunks per normal stream")
	interval := fs.Duration("interval", 20*time.Millisecond, "time between chunks")
	slow := fs.Duration("slow-interval", 5*time.Second, "time between chunks of a slow stream")
	_ = fs.Parse(args)

	u := &upstream{chunks: *chunks, interval: *interval, slowInterval: *slow}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/chat/completions", u.chat)
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(modelsBody)
	})
	mux.HandleFunc("/bench/open", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"open":%d,"peak":%d,"started":%d,"requests":%d}`,
			atomic.LoadInt64(&u.slowOpen), atomic.LoadInt64(&u.slowPeak),
			atomic.LoadInt64(&u.slowStarted), atomic.LoadInt64(&u.requests))
	})
	mux.HandleFunc("/bench/reset-peak", func(w http.ResponseWriter, r *http.Request) {
		atomic.StoreInt64(&u.slowPeak, atomic.LoadInt64(&u.slowOpen))
		w.WriteHeader(http.StatusNoContent)
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	// The orchestrator reads the port from this line.
	fmt.Printf("listening %s\n", ln.Addr().String())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.Serve(ln))
}

func (u *upstream) chat(w http.ResponseWriter, r *http.Request) {
	atomic.AddInt64(&u.requests, 1)
	if r.Method != http.MethodPost {
		http.Error(w, `{"error":{"message":"method","type":"invalid_request_error"}}`, 405)
		return
	}
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	var req chatRequest
	if err := json.Unmarshal(raw, &req); err != nil {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(400)
		_, _ = w.Write([]byte(`{"error":{"message":"invalid json","type":"invalid_request_error"}}`))
		return
	}
	if !req.Stream {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(completionBody)))
		_, _ = w.Write(completionBody)
		return
	}
	usage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage
	if strings.HasPrefix(req.Model, "bench-slow") {
		u.slowStream(w, r)
		return
	}
	u.stream(w, r, usage)
}

func chunk(i int, content string, finish string) []byte {
	fin := "null"
	if finish != "" {
		fin = `"` + finish + `"`
	}
	delta := `{"content":"` + content + `"}`
	if i == 0 {
		delta = `{"role":"assistant","content":"` + content + `"}`
	}
	return []byte(`data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,` +
		`"model":"bench-model","choices":[{"index":0,"delta":` + delta + `,"logprobs":null,` +
		`"finish_reason":` + fin + `}],"bench_seq":` + strconv.Itoa(i) +
		`,"bench_sent_ns":` + strconv.FormatInt(time.Now().UnixNano(), 10) + "}\n\n")
}

func startSSE(w http.ResponseWriter) http.Flusher {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(200)
	f, _ := w.(http.Flusher)
	return f
}

func (u *upstream) stream(w http.ResponseWriter, r *http.Request, usage bool) {
	f := startSSE(w)
	start := time.Now()
	for i := 0; i < u.chunks; i++ {
		if i > 0 {
			// Sleep to the i-th tick (not by `interval` after the last write), so that
			// scheduling noise does not accumulate over the stream.
			time.Sleep(time.Until(start.Add(time.Duration(i) * u.interval)))
		}
		finish := ""
		if i == u.chunks-1 {
			finish = "stop"
		}
		if _, err := w.Write(chunk(i, "tok"+strconv.Itoa(i)+" ", finish)); err != nil {
			return
		}
		f.Flush()
	}
	tail := "data: [DONE]\n\n"
	if usage {
		tail = `data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,` +
			`"model":"bench-model","choices":[],"usage":{"prompt_tokens":42,` +
			`"completion_tokens":` + strconv.Itoa(u.chunks) + `,"total_tokens":` +
			strconv.Itoa(42+u.chunks) + "}}\n\n" + tail
	}
	_, _ = w.Write([]byte(tail))
	f.Flush()
}

func (u *upstream) slowStream(w http.ResponseWriter, r *http.Request) {
	open := atomic.AddInt64(&u.slowOpen, 1)
	atomic.AddInt64(&u.slowStarted, 1)
	for {
		peak := atomic.LoadInt64(&u.slowPeak)
		if open <= peak || atomic.CompareAndSwapInt64(&u.slowPeak, peak, open) {
			break
		}
	}
	defer atomic.AddInt64(&u.slowOpen, -1)
	f := startSSE(w)
	ticker := time.NewTicker(u.slowInterval)
	defer ticker.Stop()
	deadline := time.Now().Add(10 * time.Minute)
	for i := 0; time.Now().Before(deadline); i++ {
		if _, err := w.Write(chunk(i, "slow"+strconv.Itoa(i)+" ", "")); err != nil {
			return
		}
		f.Flush()
		select {
		case <-r.Context().Done():
			return
		case <-ticker.C:
		}
	}
}
