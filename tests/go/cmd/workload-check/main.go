// Command workload-check drives a SPIFFE Workload API with go-spiffe's
// workloadapi, jwtsvid and spiffetls packages alone, for tether's
// interoperability tests.
//
// Usage:
//
//	workload-check x509-context -socket unix:///PATH
//	workload-check x509-svids   -socket unix:///PATH
//	workload-check jwt          -socket unix:///PATH -audience AUD [-subject ID]
//	workload-check validate     -socket unix:///PATH -audience AUD -token TOKEN
//	workload-check offline      -socket unix:///PATH -audience AUD -token TOKEN
//	workload-check watch-x509   -socket unix:///PATH -rotations N [-timeout D]
//	workload-check watch-jwt    -socket unix:///PATH -audience AUD -rotations N [-timeout D]
//	workload-check serve        -socket unix:///PATH -listen ADDR -authorize ID
//	workload-check dial         -socket unix:///PATH -addr ADDR -authorize ID
//
// Each subcommand prints one JSON object on stdout (serve prints the address
// it listens on first, then one JSON object per connection). Any failure is
// a non-zero exit with the error on stderr.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// subcommands maps each subcommand to what runs it with its arguments.
var subcommands = map[string]func(args []string) error{
	"x509-context": x509Context,
	"x509-svids":   x509SVIDs,
	"jwt":          fetchJWT,
	"validate":     validateJWT,
	"offline":      offlineJWT,
	"watch-x509":   watchX509,
	"watch-jwt":    watchJWT,
	"serve":        serve,
	"dial":         dial,
}

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: %s SUBCOMMAND [flags]", os.Args[0]))
	}
	run, ok := subcommands[os.Args[1]]
	if !ok {
		fail(fmt.Errorf("unknown subcommand %q", os.Args[1]))
	}
	if err := run(os.Args[2:]); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "workload-check:", err)
	os.Exit(1)
}

// common holds the flags every subcommand shares.
type common struct {
	socket  string
	timeout time.Duration
}

// newFlags is a flag set for subcommand name with the shared flags.
func newFlags(name string, c *common) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.StringVar(&c.socket, "socket", "", "the Workload API address, unix:///PATH")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "how long the whole subcommand may take")
	return fs
}

// parse parses args and checks the shared flags.
func (c *common) parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("%s: unexpected arguments %q", fs.Name(), fs.Args())
	}
	if c.socket == "" {
		return fmt.Errorf("%s: -socket is required", fs.Name())
	}
	return nil
}

// context is a context that ends after the subcommand's timeout.
func (c *common) context() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.timeout)
}

// client connects a Workload API client to the socket.
func (c *common) client(ctx context.Context) (*workloadapi.Client, error) {
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(c.socket))
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", c.socket, err)
	}
	return client, nil
}

// sourceOptions points a source at the socket.
func (c *common) sourceOptions() workloadapi.SourceOption {
	return workloadapi.WithClientOptions(workloadapi.WithAddr(c.socket))
}

// x509Out is one X.509-SVID as printed.
type x509Out struct {
	ID     string `json:"id"`
	Hint   string `json:"hint"`
	Serial string `json:"serial"`
	Expiry int64  `json:"expiry"`
}

func describeX509(svid *x509svid.SVID) x509Out {
	leaf := svid.Certificates[0]
	return x509Out{
		ID:     svid.ID.String(),
		Hint:   svid.Hint,
		Serial: leaf.SerialNumber.Text(16),
		Expiry: leaf.NotAfter.Unix(),
	}
}

// sorted returns names sorted, so the output does not depend on map order.
func sorted(names []string) []string {
	sort.Strings(names)
	return names
}

// emit prints v as one JSON line on stdout.
func emit(v any) error {
	line, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding the result: %w", err)
	}
	_, err = fmt.Println(string(line))
	return err
}
