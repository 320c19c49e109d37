// Command benchtool is the compiled half of chatproxy's benchmark (tests/bench/run.py drives it).
//
//	benchtool upstream -addr 127.0.0.1:PORT      a mock OpenAI-compatible upstream
//	benchtool load < spec.json                   interleaved load against several targets
//	benchtool hold < spec.json                   open N slow streams, hold them, then leave
//	benchtool pgcount -listen A -upstream B -http C  a PostgreSQL wire proxy counting round trips
//
// Everything uses Go's standard library only, so Debian's golang-go builds it offline.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtool upstream|load|hold|pgcount [flags]")
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "upstream":
		runUpstream(args)
	case "load":
		runLoad(args)
	case "hold":
		runHold(args)
	case "pgcount":
		runPgcount(args)
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(2)
	}
}
