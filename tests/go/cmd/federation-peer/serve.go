package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/logger"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func serve(args []string) error {
	flags := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := flags.String("listen", "127.0.0.1:0", "the address to listen on")
	tdName := flags.String("trust-domain", "", "the trust domain whose bundle is served")
	bundlePath := flags.String("bundle", "", "the SPIFFE bundle document served (re-read when it changes, or on SIGHUP)")
	profile := flags.String("profile", "", "https_web or https_spiffe")
	certPath := flags.String("cert", "", "the server's PEM certificate chain (https_spiffe: an X.509-SVID)")
	keyPath := flags.String("key", "", "the server's PEM private key (https_spiffe: PKCS#8)")
	if err := flags.Parse(args); err != nil {
		return err
	}
	td, err := spiffeid.TrustDomainFromString(*tdName)
	if err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	source, err := newFileSource(td, *bundlePath)
	if err != nil {
		return err
	}
	tlsConfig, err := serverTLS(*profile, *certPath, *keyPath)
	if err != nil {
		return err
	}
	handler, err := federation.NewHandler(td, source, federation.WithLogger(logger.Std))
	if err != nil {
		return err
	}

	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Println(listener.Addr())

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
	server := &http.Server{
		Handler:           handler,
		TLSConfig:         tlsConfig,
		ReadHeaderTimeout: 10 * time.Second,
	}
	done := make(chan error, 1)
	go func() { done <- server.ServeTLS(listener, "", "") }()
	for {
		select {
		case err := <-done:
			return err
		case sig := <-signals:
			if sig == syscall.SIGHUP {
				source.reload()
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return server.Shutdown(ctx)
		}
	}
}

// serverTLS is the endpoint's TLS under profile: a web certificate, or an
// X.509-SVID presented with go-spiffe's server configuration.
func serverTLS(profile, certPath, keyPath string) (*tls.Config, error) {
	switch profile {
	case profileWeb:
		cert, err := tls.LoadX509KeyPair(certPath, keyPath)
		if err != nil {
			return nil, fmt.Errorf("--cert/--key: %w", err)
		}
		return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
	case profileSPIFFE:
		svid, err := x509svid.Load(certPath, keyPath)
		if err != nil {
			return nil, fmt.Errorf("--cert/--key: %w", err)
		}
		return tlsconfig.TLSServerConfig(svid), nil
	default:
		return nil, fmt.Errorf("--profile %q: want %s or %s", profile, profileWeb, profileSPIFFE)
	}
}

// fileSource serves the bundle in a file: it is re-read when the file's
// size or modification time changes (checked on every request) or on
// reload. A file that does not parse is logged and the last good bundle
// stays served.
type fileSource struct {
	td   spiffeid.TrustDomain
	path string

	mu     sync.Mutex
	bundle *spiffebundle.Bundle
	stamp  stamp
}

type stamp struct {
	size    int64
	modTime time.Time
}

func newFileSource(td spiffeid.TrustDomain, path string) (*fileSource, error) {
	if path == "" {
		return nil, errors.New("--bundle is required")
	}
	source := &fileSource{td: td, path: path}
	if err := source.load(); err != nil {
		return nil, err
	}
	return source, nil
}

// GetBundleForTrustDomain implements spiffebundle.Source.
func (s *fileSource) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if td != s.td {
		return nil, fmt.Errorf("no bundle for trust domain %q", td)
	}
	if info, err := os.Stat(s.path); err == nil && s.changed(info) {
		s.reload()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bundle, nil
}

func (s *fileSource) changed(info os.FileInfo) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return stamp{info.Size(), info.ModTime()} != s.stamp
}

// reload re-reads the file, keeping the last good bundle on a failure.
func (s *fileSource) reload() {
	if err := s.load(); err != nil {
		logger.Std.Warnf("keeping the last good bundle: %v", err)
	}
}

func (s *fileSource) load() error {
	info, err := os.Stat(s.path)
	if err != nil {
		return fmt.Errorf("--bundle: %w", err)
	}
	bundle, err := spiffebundle.Load(s.td, s.path)
	if err != nil {
		return fmt.Errorf("--bundle: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bundle = bundle
	s.stamp = stamp{info.Size(), info.ModTime()}
	return nil
}
