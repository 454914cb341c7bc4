package main

import (
	"context"
	"flag"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// watchFlags parses -rotations (at least 1) and, with audience non-nil,
// -audience (required).
func watchFlags(fs *flag.FlagSet, c *common, args []string, audience *string) (int, error) {
	var rotations int
	fs.IntVar(&rotations, "rotations", 1, "how many rotations to see before exiting")
	if audience != nil {
		fs.StringVar(audience, "audience", "", "the JWT-SVIDs' audience")
	}
	if err := c.parse(fs, args); err != nil {
		return 0, err
	}
	if rotations < 1 {
		return 0, fmt.Errorf("%s: -rotations must be at least 1", fs.Name())
	}
	if audience != nil && *audience == "" {
		return 0, fmt.Errorf("%s: -audience is required", fs.Name())
	}
	return rotations, nil
}

// watchX509 watches an X509Source until its default SVID has been replaced
// -rotations times, and prints each SVID seen.
func watchX509(args []string) error {
	var c common
	fs := newFlags("watch-x509", &c)
	rotations, err := watchFlags(fs, &c, args, nil)
	if err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	source, err := workloadapi.NewX509Source(ctx, c.sourceOptions())
	if err != nil {
		return fmt.Errorf("NewX509Source: %w", err)
	}
	defer source.Close()

	var seen []x509Out
	for len(seen) <= rotations {
		svid, err := source.GetX509SVID()
		if err != nil {
			return fmt.Errorf("X509Source.GetX509SVID: %w", err)
		}
		current := describeX509(svid)
		if len(seen) == 0 || seen[len(seen)-1].Serial != current.Serial {
			seen = append(seen, current)
			continue
		}
		select {
		case <-source.Updated():
		case <-ctx.Done():
			return fmt.Errorf("saw %d of %d rotations (%v): %w", len(seen)-1, rotations, seen, ctx.Err())
		}
	}
	return emit(map[string]any{"seen": seen})
}

// watchJWT fetches JWT-SVIDs for -audience through a JWTSource until it has
// seen -rotations replacements (a token with a later expiry), validating
// each offline against the source's JWT bundles, and prints each seen.
func watchJWT(args []string) error {
	var c common
	var audience string
	fs := newFlags("watch-jwt", &c)
	rotations, err := watchFlags(fs, &c, args, &audience)
	if err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	source, err := workloadapi.NewJWTSource(ctx, c.sourceOptions())
	if err != nil {
		return fmt.Errorf("NewJWTSource: %w", err)
	}
	defer source.Close()

	var seen []jwtOut
	for len(seen) <= rotations {
		svid, err := source.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
		if err != nil {
			return fmt.Errorf("JWTSource.FetchJWTSVID: %w", err)
		}
		if _, err := jwtsvid.ParseAndValidate(svid.Marshal(), source, []string{audience}); err != nil {
			return fmt.Errorf("validating a fetched JWT-SVID against the JWTSource's bundles: %w", err)
		}
		if len(seen) == 0 || seen[len(seen)-1].Expiry < svid.Expiry.Unix() {
			seen = append(seen, describeJWT(svid, false))
			continue
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return fmt.Errorf("saw %d of %d rotations: %w", len(seen)-1, rotations, err)
		}
	}
	return emit(map[string]any{"seen": seen})
}

// sleep waits for d, or returns the context's error if it ends first.
func sleep(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
