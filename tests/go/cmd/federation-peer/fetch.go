package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// fetched is what fetch prints: the bundle as go-spiffe understood it.
type fetched struct {
	TrustDomain        string   `json:"trust_domain"`
	X509Authorities    int      `json:"x509_authorities"`
	JWTKeyIDs          []string `json:"jwt_key_ids"`
	SequenceNumber     *uint64  `json:"spiffe_sequence"`
	RefreshHintSeconds *int64   `json:"spiffe_refresh_hint"`
}

func fetch(args []string) error {
	flags := flag.NewFlagSet("fetch", flag.ContinueOnError)
	url := flags.String("url", "", "the bundle endpoint's URL")
	tdName := flags.String("trust-domain", "", "the endpoint's trust domain")
	profile := flags.String("profile", "", "https_web or https_spiffe")
	caPath := flags.String("ca", "", "https_web: PEM CA certificates the endpoint's certificate chains to")
	endpointID := flags.String("endpoint-id", "", "https_spiffe: the SPIFFE ID the endpoint presents")
	bootstrap := flags.String("bundle", "", "https_spiffe: the trust domain's bundle to authenticate the endpoint with")
	timeout := flags.Duration("timeout", 10*time.Second, "the whole fetch's deadline")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *url == "" {
		return errors.New("--url is required")
	}
	td, err := spiffeid.TrustDomainFromString(*tdName)
	if err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	option, err := fetchOption(td, *profile, *caPath, *endpointID, *bootstrap)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	bundle, err := federation.FetchBundle(ctx, td, *url, option)
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(describe(bundle))
}

// fetchOption is how the endpoint is authenticated under profile.
func fetchOption(td spiffeid.TrustDomain, profile, caPath, endpointID, bootstrap string) (federation.FetchOption, error) {
	switch profile {
	case profileWeb:
		if caPath == "" {
			return nil, errors.New("https_web needs --ca")
		}
		pem, err := os.ReadFile(caPath)
		if err != nil {
			return nil, fmt.Errorf("--ca: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca %s: no PEM certificate", caPath)
		}
		return federation.WithWebPKIRoots(roots), nil
	case profileSPIFFE:
		id, err := spiffeid.FromString(endpointID)
		if err != nil {
			return nil, fmt.Errorf("--endpoint-id: %w", err)
		}
		bundle, err := spiffebundle.Load(td, bootstrap)
		if err != nil {
			return nil, fmt.Errorf("--bundle: %w", err)
		}
		return federation.WithSPIFFEAuth(bundle, id), nil
	default:
		return nil, fmt.Errorf("--profile %q: want %s or %s", profile, profileWeb, profileSPIFFE)
	}
}

func describe(bundle *spiffebundle.Bundle) fetched {
	out := fetched{
		TrustDomain:     bundle.TrustDomain().Name(),
		X509Authorities: len(bundle.X509Authorities()),
		JWTKeyIDs:       []string{},
	}
	for kid := range bundle.JWTAuthorities() {
		out.JWTKeyIDs = append(out.JWTKeyIDs, kid)
	}
	sort.Strings(out.JWTKeyIDs)
	if sequence, ok := bundle.SequenceNumber(); ok {
		out.SequenceNumber = &sequence
	}
	if hint, ok := bundle.RefreshHint(); ok {
		seconds := int64(hint / time.Second)
		out.RefreshHintSeconds = &seconds
	}
	return out
}
