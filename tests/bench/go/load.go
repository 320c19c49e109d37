package main

// The load generator: several targets, measured in interleaved windows.
//
// A spec (JSON on stdin) lists targets; every round gives each target one window of `window_s`
// seconds with `concurrency` closed-loop clients (the order of targets rotates from round to
// round, so drift hits all of them alike). A request counts in the window it started in; its
// latency runs from just before the request is written to the last byte of the body.
// For streams it also records the time to the first SSE event, and for every event carrying
// "bench_sent_ns" the delay between the upstream writing it and the client reading it.
// CPU: for each target's `cpu_pids`, utime+stime from /proc/<pid>/stat before and after each
// window (all of the process's threads), summed over the windows.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type target struct {
	Name    string            `json:"name"`
	Method  string            `json:"method"` // default POST; a GET is sent without a body
	URL     string            `json:"url"`
	Headers map[string]string `json:"headers"`
	Bodies  []string          `json:"bodies"`
	CPUPids []int             `json:"cpu_pids"`
	// Other processes whose CPU time is reported beside (e.g. the database's backends).
	ExtraPids []int `json:"extra_pids"`
	// Each request takes the next body (round robin over all clients) instead of client i
	// always sending body i.
	Cycle bool `json:"cycle"`
	next  uint64
	reqs  [][]byte // the serialized requests, one per body
	addr  string
}

type loadSpec struct {
	Mode        string   `json:"mode"` // "request" or "stream"
	Concurrency int      `json:"concurrency"`
	Rounds      int      `json:"rounds"`
	WindowS     float64  `json:"window_s"`
	WarmupS     float64  `json:"warmup_s"`
	TimeoutS    float64  `json:"timeout_s"`
	Targets     []target `json:"targets"`
}

type targetResult struct {
	Name        string         `json:"name"`
	Requests    int            `json:"requests"`
	Errors      int            `json:"errors"`
	ErrorSample string         `json:"error_sample,omitempty"`
	Statuses    map[string]int `json:"statuses"`
	ElapsedS    float64        `json:"elapsed_s"`
	LatencyUs   []int64        `json:"latency_us"`
	TTFBUs      []int64        `json:"ttfb_us,omitempty"`
	ChunkLagUs  [][]int64      `json:"chunk_lag_us,omitempty"` // by chunk index
	CPUTicks    int64          `json:"cpu_ticks"`
	ExtraTicks  int64          `json:"extra_cpu_ticks"`
	// Per round (window), the p50 of that window's latencies and (streams) times to first
	// event: drift and noise bursts can then be compared round by round.
	RoundP50Us     []int64           `json:"round_p50_us"`
	RoundTTFBP50Us []int64           `json:"round_ttfb_p50_us,omitempty"`
	Headers        map[string]string `json:"headers_seen,omitempty"`
}

type sample struct {
	latency int64
	ttfb    int64
	lags    []int64
	status  int
	err     string
	headers map[string]string
}

func cpuTicks(pid int) int64 {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// Fields after the ")" closing the command name: state is field 3; utime, stime are 14, 15.
	s := string(raw)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(fields[11], 10, 64)
	st, _ := strconv.ParseInt(fields[12], 10, 64)
	return u + st
}

func sumTicks(pids []int) int64 {
	var total int64
	for _, p := range pids {
		total += cpuTicks(p)
	}
	return total
}

var sentKey = []byte(`"bench_sent_ns":`)
var seqKey = []byte(`"bench_seq":`)

func intAfter(line, key []byte) (int64, bool) {
	i := bytes.Index(line, key)
	if i < 0 {
		return 0, false
	}
	j := i + len(key)
	k := j
	for k < len(line) && line[k] >= '0' && line[k] <= '9' {
		k++
	}
	v, err := strconv.ParseInt(string(line[j:k]), 10, 64)
	return v, err == nil
}

// window runs `concurrency` clients against t for `d`, each on a fresh keep-alive connection
// (so none is left over from an earlier window, idle past the server's keep-alive timeout);
// it returns the samples and the wall time.
func window(t *target, concurrency int, d time.Duration, stream bool, timeout time.Duration) ([]sample, time.Duration) {
	var mu sync.Mutex
	var all []sample
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			conn := &rawConn{addr: t.addr}
			defer conn.close()
			req := t.reqs[w%len(t.reqs)]
			local := make([]sample, 0, 256)
			for time.Now().Before(deadline) {
				if t.Cycle {
					req = t.reqs[atomic.AddUint64(&t.next, 1)%uint64(len(t.reqs))]
				}
				var s sample
				conn.do(req, stream, timeout, &s)
				local = append(local, s)
			}
			mu.Lock()
			all = append(all, local...)
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	return all, time.Since(start)
}

// median is the nearest-rank p50 (-1 for no values).
func median(values []int64) int64 {
	if len(values) == 0 {
		return -1
	}
	sorted := append([]int64(nil), values...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	return sorted[(len(sorted)+1)/2-1]
}

func runLoad(args []string) {
	var spec loadSpec
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		fmt.Fprintln(os.Stderr, "bad spec:", err)
		os.Exit(2)
	}
	if spec.TimeoutS == 0 {
		spec.TimeoutS = 60
	}
	stream := spec.Mode == "stream"
	timeout := time.Duration(spec.TimeoutS * float64(time.Second))
	results := make([]*targetResult, len(spec.Targets))
	for i := range spec.Targets {
		t := &spec.Targets[i]
		for _, body := range t.Bodies {
			req, addr, err := buildRequest(t, body)
			if err != nil {
				fmt.Fprintln(os.Stderr, "bad target:", err)
				os.Exit(2)
			}
			t.reqs, t.addr = append(t.reqs, req), addr
		}
		results[i] = &targetResult{Name: t.Name, Statuses: map[string]int{},
			Headers: map[string]string{}}
	}
	warm := time.Duration(spec.WarmupS * float64(time.Second))
	if warm > 0 {
		for i := range spec.Targets {
			window(&spec.Targets[i], spec.Concurrency, warm, stream, timeout)
		}
	}
	d := time.Duration(spec.WindowS * float64(time.Second))
	n := len(spec.Targets)
	for r := 0; r < spec.Rounds; r++ {
		for k := 0; k < n; k++ {
			i := (r + k) % n
			t := &spec.Targets[i]
			res := results[i]
			before, extra := sumTicks(t.CPUPids), sumTicks(t.ExtraPids)
			samples, took := window(t, spec.Concurrency, d, stream, timeout)
			res.CPUTicks += sumTicks(t.CPUPids) - before
			res.ExtraTicks += sumTicks(t.ExtraPids) - extra
			res.ElapsedS += took.Seconds()
			var lat, ttfb []int64
			for _, s := range samples {
				if s.err == "" {
					lat = append(lat, s.latency)
					ttfb = append(ttfb, s.ttfb)
				}
			}
			res.RoundP50Us = append(res.RoundP50Us, median(lat))
			if stream {
				res.RoundTTFBP50Us = append(res.RoundTTFBP50Us, median(ttfb))
			}
			for _, s := range samples {
				res.Requests++
				res.Statuses[strconv.Itoa(s.status)]++
				if s.err != "" {
					res.Errors++
					if res.ErrorSample == "" {
						res.ErrorSample = s.err
					}
					continue
				}
				res.LatencyUs = append(res.LatencyUs, s.latency)
				if stream {
					res.TTFBUs = append(res.TTFBUs, s.ttfb)
					for idx, lag := range s.lags {
						for len(res.ChunkLagUs) <= idx {
							res.ChunkLagUs = append(res.ChunkLagUs, nil)
						}
						if lag >= 0 {
							res.ChunkLagUs[idx] = append(res.ChunkLagUs[idx], lag)
						}
					}
				}
				for h, v := range s.headers {
					res.Headers[h] = v
				}
			}
		}
	}
	out := make([]*targetResult, n)
	copy(out, results)
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(map[string]interface{}{"targets": out}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
