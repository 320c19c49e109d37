package main

// The mock upstream: OpenAI's /v1/chat/completions with canned answers.
//
//   - stream false: one canned chat completion (with usage);
//   - stream true: `chunks` chunks `interval` apart, each carrying "bench_sent_ns" (the wall clock
//     when it was written), the last with finish_reason "stop", then an optional usage chunk
//     (stream_options.include_usage) and `data: [DONE]`;
//   - stream true and a model starting with "bench-slow": one chunk at once, then one every
//     `slow-interval` for up to ten minutes; GET /bench/open reports how many such streams are
//     open right now (a stream counts as open until its handler sees the client gone);
//   - a model "bench-ctx-N": a request body over N bytes is refused as too long for the
//     context (400, llama.cpp's error without numbers, so a proxy cannot learn a window from
//     it and every such turn takes the overflow path); a smaller one is answered as above.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"runtime/debug"
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

// A body without it is not a stream request, whatever else it holds.
var streamKey = []byte(`"stream"`)

// A body with it may be refused for its size (a "bench-ctx-N" model).
var contextKey = []byte(`"bench-ctx-`)

const contextModel = "bench-ctx-"

var contextError = []byte(`{"error":{"code":400,"message":"the request exceeds the available ` +
	`context size, try increasing it","type":"exceed_context_size_error"}}`)

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
	// A lazier collector, and no read timeouts (each would arm a timer per request): the mock
	// serves the benchmark's own clients on loopback, and its rate must stay far above the proxy's.
	debug.SetGCPercent(400)
	handed := &handoff{conns: make(chan net.Conn), addr: ln.Addr()}
	go func() { log.Fatal((&http.Server{Handler: mux}).Serve(handed)) }()
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go u.serveFast(c, handed)
	}
}

// serveFast answers a connection's non-streamed chat completions itself, from pre-built bytes;
// at the first request it does not answer (a stream, another path, anything unusual), it hands
// the connection, that request included, to net/http, which serves it from then on.
func (u *upstream) serveFast(c net.Conn, slow *handoff) {
	br := bufio.NewReaderSize(c, 16<<10)
	var req []byte
	for {
		req = req[:0]
		simple, length := true, 0
		for first := true; ; first = false {
			line, err := br.ReadSlice('\n')
			req = append(req, line...)
			if err != nil {
				if len(req) == 0 && err == io.EOF {
					c.Close()
					return
				}
				simple = false // an unusually long line, or a request cut short
				break
			}
			if first {
				simple = bytes.HasPrefix(line, []byte("POST /v1/chat/completions "))
				continue
			}
			if len(line) <= 2 {
				break // the blank line ending the head
			}
			name, value, _ := bytes.Cut(line, []byte(":"))
			value = bytes.TrimSpace(value)
			switch strings.ToLower(string(name)) {
			case "content-length":
				length, err = strconv.Atoi(string(value))
				simple = simple && err == nil && length >= 0 && length <= 1<<20
			case "transfer-encoding", "expect", "upgrade":
				simple = false
			case "connection":
				simple = simple && !bytes.EqualFold(value, []byte("close"))
			}
		}
		if simple {
			start := len(req)
			req = append(req, make([]byte, length)...)
			if _, err := io.ReadFull(br, req[start:]); err != nil {
				c.Close() // the client left mid-body
				return
			}
			simple = !bytes.Contains(req[start:], streamKey) &&
				!bytes.Contains(req[start:], contextKey)
		}
		if !simple {
			rest := io.MultiReader(bytes.NewReader(append([]byte(nil), req...)), br)
			slow.conns <- &replayConn{Conn: c, r: rest}
			return
		}
		atomic.AddInt64(&u.requests, 1)
		if _, err := c.Write(fastCompletion); err != nil {
			c.Close()
			return
		}
	}
}

var fastCompletion = []byte("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" +
	"Content-Length: " + strconv.Itoa(len(completionBody)) + "\r\n\r\n" + string(completionBody))

// handoff is the listener net/http serves: the connections serveFast passes on.
type handoff struct {
	conns chan net.Conn
	addr  net.Addr
}

func (h *handoff) Accept() (net.Conn, error) { return <-h.conns, nil }
func (h *handoff) Close() error              { return nil }
func (h *handoff) Addr() net.Addr            { return h.addr }

// replayConn reads what serveFast already read first.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error) { return c.r.Read(p) }

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
	if limit, err := strconv.Atoi(strings.TrimPrefix(req.Model, contextModel)); err == nil &&
		strings.HasPrefix(req.Model, contextModel) && len(raw) > limit {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(400)
		_, _ = w.Write(contextError)
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
