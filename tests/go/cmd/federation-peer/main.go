// Command federation-peer is a SPIFFE federation peer built on go-spiffe
// alone, for tether's interoperability tests: it fetches a trust domain's
// bundle from a bundle endpoint with federation.FetchBundle, or serves one
// with federation.NewHandler.
//
// Usage:
//
//	federation-peer fetch --url URL --trust-domain TD --profile https_web --ca CA.pem
//	federation-peer fetch --url URL --trust-domain TD --profile https_spiffe --endpoint-id ID --bundle BOOTSTRAP.json
//	federation-peer serve --listen ADDR --trust-domain TD --bundle BUNDLE.json --profile https_web|https_spiffe --cert CERT.pem --key KEY.pem
//
// fetch prints the fetched bundle as one JSON object on stdout; serve prints
// the address it listens on as stdout's first line. Any failure is a
// non-zero exit with the error on stderr.
package main

import (
	"fmt"
	"os"
)

const (
	profileWeb    = "https_web"
	profileSPIFFE = "https_spiffe"
)

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: %s fetch|serve [flags]", os.Args[0]))
	}
	var err error
	switch os.Args[1] {
	case "fetch":
		err = fetch(os.Args[2:])
	case "serve":
		err = serve(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q: want fetch or serve", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "federation-peer:", err)
	os.Exit(1)
}
