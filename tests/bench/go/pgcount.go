package main

// pgcount: a PostgreSQL wire-protocol proxy that counts round trips.
//
// A round trip is a point where the client has to wait for the server: every Sync ('S', the end
// of an extended-protocol batch: Parse/Bind/Describe/Execute...) and every simple Query ('Q').
// Each one is labelled with the SQL it ran: the Query's text, or for a batch the statement of its
// first Parse, or of its first Bind (a prepared statement, named at its Parse earlier on the
// same connection). The client is told SSL is unavailable, so the traffic can be read.
//
//	GET  /counts  {"round_trips": N, "by_sql": {"<first 120 chars of SQL>": N, ...}}
//	POST /reset   zeroes the counters

import (
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync"
)

type counter struct {
	mu    sync.Mutex
	total int64
	bySQL map[string]int64
}

func (c *counter) add(label string) {
	c.mu.Lock()
	c.total++
	c.bySQL[label]++
	c.mu.Unlock()
}

func runPgcount(args []string) {
	fs := flag.NewFlagSet("pgcount", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "where clients connect")
	upstream := fs.String("upstream", "", "the server: host:port, or a unix socket path")
	httpAddr := fs.String("http", "127.0.0.1:0", "where /counts is served")
	_ = fs.Parse(args)

	c := &counter{bySQL: map[string]int64{}}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	hl, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/counts", func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		defer c.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]interface{}{"round_trips": c.total, "by_sql": c.bySQL})
	})
	mux.HandleFunc("/reset", func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		c.total = 0
		c.bySQL = map[string]int64{}
		c.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
	go func() { log.Fatal(http.Serve(hl, mux)) }()
	fmt.Printf("listening %s http %s\n", ln.Addr().String(), hl.Addr().String())
	network := "tcp"
	if strings.HasPrefix(*upstream, "/") {
		network = "unix"
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go serveConn(conn, network, *upstream, c)
	}
}

func readFull(r io.Reader, n int) ([]byte, error) {
	buf := make([]byte, n)
	_, err := io.ReadFull(r, buf)
	return buf, err
}

func cstring(b []byte) (string, []byte) {
	for i, ch := range b {
		if ch == 0 {
			return string(b[:i]), b[i+1:]
		}
	}
	return string(b), nil
}

func label(sql string) string {
	s := strings.Join(strings.Fields(sql), " ")
	if len(s) > 120 {
		s = s[:120]
	}
	return s
}

func serveConn(client net.Conn, network, addr string, c *counter) {
	defer client.Close()
	// Startup: SSLRequest / GSSENCRequest get "N"; the real startup message is forwarded.
	var startup []byte
	for {
		head, err := readFull(client, 4)
		if err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(head))
		rest, err := readFull(client, n-4)
		if err != nil {
			return
		}
		code := binary.BigEndian.Uint32(rest[:4])
		if code == 80877103 || code == 80877104 {
			if _, err := client.Write([]byte("N")); err != nil {
				return
			}
			continue
		}
		startup = append(head, rest...)
		break
	}
	server, err := net.Dial(network, addr)
	if err != nil {
		return
	}
	defer server.Close()
	if _, err := server.Write(startup); err != nil {
		return
	}
	go func() {
		_, _ = io.Copy(client, server)
		client.Close()
	}()
	statements := map[string]string{}
	pending := ""
	for {
		head, err := readFull(client, 5)
		if err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(head[1:]))
		body, err := readFull(client, n-4)
		if err != nil {
			return
		}
		switch head[0] {
		case 'Q':
			q, _ := cstring(body)
			c.add(label(q))
		case 'P':
			name, rest := cstring(body)
			q, _ := cstring(rest)
			statements[name] = q
			if pending == "" {
				pending = label(q)
			}
		case 'B':
			_, rest := cstring(body)
			stmt, _ := cstring(rest)
			if pending == "" {
				pending = label(statements[stmt])
			}
		case 'S':
			if pending == "" {
				pending = "(sync)"
			}
			c.add(pending)
			pending = ""
		}
		if _, err := server.Write(append(head, body...)); err != nil {
			return
		}
	}
}
