package main

// hold: open N slow streams at once, report when every one has its first event, keep them open
// until a line arrives on stdin, then leave all at once (each request's context is cancelled,
// which closes its connection) and report.
//
// Protocol on stdin/stdout: the spec is the first stdin line (JSON); stdout gets one JSON line
// when all streams are open ({"opened", "failed", "open_s", "error_sample"}); any further stdin
// line makes the clients leave; then one more JSON line ({"left"}) and exit.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type holdSpec struct {
	URL        string            `json:"url"`
	Headers    map[string]string `json:"headers"`
	Bodies     []string          `json:"bodies"`
	N          int               `json:"n"`
	OpenAtOnce int               `json:"open_at_once"`
}

func runHold(args []string) {
	in := bufio.NewReader(os.Stdin)
	line, err := in.ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(os.Stderr, "no spec:", err)
		os.Exit(2)
	}
	var spec holdSpec
	if err := json.Unmarshal([]byte(line), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "bad spec:", err)
		os.Exit(2)
	}
	if spec.OpenAtOnce <= 0 {
		spec.OpenAtOnce = 50
	}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
	}
	client := &http.Client{Transport: tr}
	ctx, cancel := context.WithCancel(context.Background())
	var opened, failed int64
	var sampleMu sync.Mutex
	errSample := ""
	gate := make(chan struct{}, spec.OpenAtOnce)
	ready := make(chan struct{}, spec.N)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < spec.N; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			signalled := false
			signal := func(ok bool, msg string) {
				if signalled {
					return
				}
				signalled = true
				if ok {
					atomic.AddInt64(&opened, 1)
				} else {
					atomic.AddInt64(&failed, 1)
					sampleMu.Lock()
					if errSample == "" {
						errSample = msg
					}
					sampleMu.Unlock()
				}
				<-gate
				ready <- struct{}{}
			}
			gate <- struct{}{}
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, spec.URL,
				strings.NewReader(spec.Bodies[i%len(spec.Bodies)]))
			req.Header.Set("Content-Type", "application/json")
			for k, v := range spec.Headers {
				req.Header.Set(k, v)
			}
			resp, err := client.Do(req)
			if err != nil {
				signal(false, err.Error())
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				signal(false, fmt.Sprintf("status %d", resp.StatusCode))
				return
			}
			r := bufio.NewReader(resp.Body)
			for {
				l, err := r.ReadString('\n')
				if strings.HasPrefix(l, "data:") {
					signal(true, "")
				}
				if err != nil {
					signal(false, "stream ended before its first event: "+err.Error())
					return
				}
			}
		}(i)
	}
	timeout := time.After(60 * time.Second)
	for k := 0; k < spec.N; k++ {
		select {
		case <-ready:
		case <-timeout:
			k = spec.N
		}
	}
	out, _ := json.Marshal(map[string]interface{}{
		"opened": atomic.LoadInt64(&opened), "failed": atomic.LoadInt64(&failed),
		"open_s": time.Since(start).Seconds(), "error_sample": errSample,
	})
	fmt.Println(string(out))
	_, _ = in.ReadString('\n')
	cancel()
	wg.Wait()
	tr.CloseIdleConnections()
	out, _ = json.Marshal(map[string]interface{}{"left": atomic.LoadInt64(&opened)})
	fmt.Println(string(out))
}
