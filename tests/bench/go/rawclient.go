package main

// A minimal HTTP/1.1 client for the load generator: each client goroutine keeps one
// keep-alive connection per target and writes pre-built request bytes on it, then parses the
// response (Content-Length or chunked) itself. It costs a fraction of net/http's client, so the
// load tool stays far from being the bottleneck, and every target pays the same for it.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"
)

type rawConn struct {
	addr string
	conn net.Conn
	r    *bufio.Reader
	line []byte // the SSE line being assembled across chunks
}

// buildRequest serializes one request of `body` to target t (a POST unless t.Method says).
func buildRequest(t *target, body string) ([]byte, string, error) {
	u, err := url.Parse(t.URL)
	if err != nil {
		return nil, "", err
	}
	if u.Scheme != "http" {
		return nil, "", fmt.Errorf("only http:// targets are supported, got %s", t.URL)
	}
	addr := u.Host
	if u.Port() == "" {
		addr += ":80"
	}
	var b bytes.Buffer
	if t.Method == "GET" {
		fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\n", u.RequestURI(), u.Host)
		for k, v := range t.Headers {
			fmt.Fprintf(&b, "%s: %s\r\n", k, v)
		}
		b.WriteString("\r\n")
		return b.Bytes(), addr, nil
	}
	fmt.Fprintf(&b, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n", u.RequestURI(), u.Host)
	for k, v := range t.Headers {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	fmt.Fprintf(&b, "Content-Length: %d\r\n\r\n%s", len(body), body)
	return b.Bytes(), addr, nil
}

func (c *rawConn) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

func (c *rawConn) ensure(timeout time.Duration) error {
	if c.conn != nil {
		return nil
	}
	conn, err := net.DialTimeout("tcp", c.addr, 5*time.Second)
	if err != nil {
		return err
	}
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.SetNoDelay(true)
	}
	c.conn = conn
	c.r = bufio.NewReaderSize(conn, 64*1024)
	return nil
}

var errClosed = errors.New("connection closed by the server")

// do sends one request and reads the whole answer, filling in s (status, latency, TTFB,
// chunk lags, history headers).
func (c *rawConn) do(req []byte, stream bool, timeout time.Duration, s *sample) {
	if err := c.ensure(timeout); err != nil {
		s.err = err.Error()
		return
	}
	_ = c.conn.SetDeadline(time.Now().Add(timeout))
	start := time.Now()
	if _, err := c.conn.Write(req); err != nil {
		c.close()
		s.err = err.Error()
		return
	}
	status, length, chunked, keep, err := c.readHead(s)
	if err != nil {
		c.close()
		s.err = err.Error()
		return
	}
	s.status = status
	s.ttfb = -1
	c.line = c.line[:0]
	sse := stream && status == 200
	var body []byte
	onData := func(p []byte) {
		if sse {
			c.feedSSE(p, start, s)
		} else if status != 200 && len(body) < 300 {
			body = append(body, p...)
		}
	}
	switch {
	case chunked:
		err = c.readChunked(onData)
	case length >= 0:
		err = c.readN(length, onData)
	default:
		err = c.readToEOF(onData)
		keep = false
	}
	s.latency = time.Since(start).Microseconds()
	if err != nil {
		c.close()
		s.err = err.Error()
		return
	}
	if !keep {
		c.close()
	}
	if status != 200 {
		s.err = fmt.Sprintf("status %d: %.200s", status, body)
	}
}

func (c *rawConn) readHead(s *sample) (status int, length int64, chunked, keep bool, err error) {
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		if err == io.EOF {
			err = errClosed
		}
		return
	}
	parts := strings.SplitN(strings.TrimSpace(string(line)), " ", 3)
	if len(parts) < 2 {
		err = fmt.Errorf("bad status line %q", line)
		return
	}
	status, err = strconv.Atoi(parts[1])
	if err != nil {
		return
	}
	length, keep = -1, true
	for {
		line, err = c.r.ReadSlice('\n')
		if err != nil {
			return
		}
		h := bytes.TrimRight(line, "\r\n")
		if len(h) == 0 {
			break
		}
		i := bytes.IndexByte(h, ':')
		if i < 0 {
			continue
		}
		name := strings.ToLower(string(h[:i]))
		value := strings.TrimSpace(string(h[i+1:]))
		switch name {
		case "content-length":
			length, _ = strconv.ParseInt(value, 10, 64)
		case "transfer-encoding":
			chunked = strings.Contains(strings.ToLower(value), "chunked")
		case "connection":
			keep = !strings.EqualFold(value, "close")
		case "x-history-messages", "x-history-tokens", "x-history-dropped", "x-history-overlap",
			"x-history-retried", "x-history-summary-seq":
			if s.headers == nil {
				s.headers = map[string]string{}
			}
			s.headers[name] = value
		}
	}
	return
}

func (c *rawConn) readN(n int64, onData func([]byte)) error {
	for n > 0 {
		if c.r.Buffered() == 0 {
			if _, err := c.r.Peek(1); err != nil { // wait for the next bytes
				return err
			}
		}
		want := int64(c.r.Buffered())
		if want > n {
			want = n
		}
		p, err := c.r.Peek(int(want))
		if err != nil {
			return err
		}
		onData(p)
		_, _ = c.r.Discard(len(p))
		n -= int64(len(p))
	}
	return nil
}

func (c *rawConn) readChunked(onData func([]byte)) error {
	for {
		line, err := c.r.ReadSlice('\n')
		if err != nil {
			return err
		}
		text := strings.TrimSpace(string(line))
		if i := strings.IndexByte(text, ';'); i >= 0 {
			text = text[:i]
		}
		size, err := strconv.ParseInt(text, 16, 64)
		if err != nil {
			return fmt.Errorf("bad chunk size %q", text)
		}
		if size == 0 {
			for { // trailers, then the blank line
				line, err = c.r.ReadSlice('\n')
				if err != nil {
					return err
				}
				if len(bytes.TrimRight(line, "\r\n")) == 0 {
					return nil
				}
			}
		}
		if err := c.readN(size, onData); err != nil {
			return err
		}
		if _, err := c.r.Discard(2); err != nil { // CRLF after the chunk
			return err
		}
	}
}

func (c *rawConn) readToEOF(onData func([]byte)) error {
	buf := make([]byte, 32*1024)
	for {
		n, err := c.r.Read(buf)
		if n > 0 {
			onData(buf[:n])
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// feedSSE splits body bytes into lines; each complete "data:" line is an event arrival.
func (c *rawConn) feedSSE(p []byte, start time.Time, s *sample) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			c.line = append(c.line, p...)
			return
		}
		c.line = append(c.line, p[:i+1]...)
		p = p[i+1:]
		line := c.line
		c.line = c.line[:0]
		if !bytes.HasPrefix(line, []byte("data:")) {
			continue
		}
		now := time.Now()
		if s.ttfb < 0 {
			s.ttfb = now.Sub(start).Microseconds()
		}
		if sent, ok := intAfter(line, sentKey); ok {
			seq, _ := intAfter(line, seqKey)
			for int64(len(s.lags)) <= seq {
				s.lags = append(s.lags, -1)
			}
			s.lags[seq] = (now.UnixNano() - sent) / 1000
		}
	}
}
