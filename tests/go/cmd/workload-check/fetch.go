package main

import (
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// x509Context prints FetchX509Context's SVIDs and the trust domains of its
// bundles (the agent's own and the federated ones), each SVID checked
// against its own domain's bundle.
func x509Context(args []string) error {
	var c common
	fs := newFlags("x509-context", &c)
	if err := c.parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	x509Ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(c.socket))
	if err != nil {
		return fmt.Errorf("FetchX509Context: %w", err)
	}
	svids := make([]x509Out, 0, len(x509Ctx.SVIDs))
	for _, svid := range x509Ctx.SVIDs {
		if _, _, err := x509svid.Verify(svid.Certificates, x509Ctx.Bundles); err != nil {
			return fmt.Errorf("verifying %s against the served bundles: %w", svid.ID, err)
		}
		svids = append(svids, describeX509(svid))
	}
	domains := make([]string, 0, x509Ctx.Bundles.Len())
	for _, bundle := range x509Ctx.Bundles.Bundles() {
		domains = append(domains, bundle.TrustDomain().Name())
	}
	return emit(map[string]any{"svids": svids, "trust_domains": sorted(domains)})
}

// x509SVIDs prints FetchX509SVIDs' SVIDs.
func x509SVIDs(args []string) error {
	var c common
	fs := newFlags("x509-svids", &c)
	if err := c.parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	fetched, err := workloadapi.FetchX509SVIDs(ctx, workloadapi.WithAddr(c.socket))
	if err != nil {
		return fmt.Errorf("FetchX509SVIDs: %w", err)
	}
	svids := make([]x509Out, 0, len(fetched))
	for _, svid := range fetched {
		svids = append(svids, describeX509(svid))
	}
	return emit(map[string]any{"svids": svids})
}

// jwtOut is one JWT-SVID as printed.
type jwtOut struct {
	ID       string   `json:"id"`
	Hint     string   `json:"hint,omitempty"`
	Audience []string `json:"audience"`
	Expiry   int64    `json:"expiry"`
	Token    string   `json:"token,omitempty"`
}

func describeJWT(svid *jwtsvid.SVID, withToken bool) jwtOut {
	out := jwtOut{ID: svid.ID.String(), Hint: svid.Hint, Audience: svid.Audience, Expiry: svid.Expiry.Unix()}
	if withToken {
		out.Token = svid.Marshal()
	}
	return out
}

// fetchJWT prints FetchJWTSVID's SVID for -audience, for -subject when
// given (the default SVID otherwise), with its token.
func fetchJWT(args []string) error {
	var c common
	var audience, subject string
	fs := newFlags("jwt", &c)
	fs.StringVar(&audience, "audience", "", "the JWT-SVID's audience")
	fs.StringVar(&subject, "subject", "", "the SPIFFE ID to ask for (default: the agent's first)")
	if err := c.parse(fs, args); err != nil {
		return err
	}
	if audience == "" {
		return errors.New("jwt: -audience is required")
	}
	params := jwtsvid.Params{Audience: audience}
	if subject != "" {
		id, err := spiffeid.FromString(subject)
		if err != nil {
			return fmt.Errorf("jwt: -subject: %w", err)
		}
		params.Subject = id
	}
	ctx, cancel := c.context()
	defer cancel()
	svid, err := workloadapi.FetchJWTSVID(ctx, params, workloadapi.WithAddr(c.socket))
	if err != nil {
		return fmt.Errorf("FetchJWTSVID: %w", err)
	}
	return emit(describeJWT(svid, true))
}

// tokenFlags parses -audience and -token, both required.
func tokenFlags(name string, args []string) (common, string, string, error) {
	var c common
	var audience, token string
	fs := newFlags(name, &c)
	fs.StringVar(&audience, "audience", "", "the JWT-SVID's audience")
	fs.StringVar(&token, "token", "", "the JWT-SVID to validate")
	if err := c.parse(fs, args); err != nil {
		return c, "", "", err
	}
	if audience == "" || token == "" {
		return c, "", "", fmt.Errorf("%s: -audience and -token are required", name)
	}
	return c, audience, token, nil
}

// validateJWT prints what ValidateJWTSVID says of -token for -audience.
func validateJWT(args []string) error {
	c, audience, token, err := tokenFlags("validate", args)
	if err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	svid, err := workloadapi.ValidateJWTSVID(ctx, token, audience, workloadapi.WithAddr(c.socket))
	if err != nil {
		return fmt.Errorf("ValidateJWTSVID: %w", err)
	}
	return emit(describeJWT(svid, false))
}

// offlineJWT validates -token for -audience in this process, with
// jwtsvid.ParseAndValidate against the bundles FetchJWTBundles serves.
func offlineJWT(args []string) error {
	c, audience, token, err := tokenFlags("offline", args)
	if err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	bundles, err := workloadapi.FetchJWTBundles(ctx, workloadapi.WithAddr(c.socket))
	if err != nil {
		return fmt.Errorf("FetchJWTBundles: %w", err)
	}
	svid, err := jwtsvid.ParseAndValidate(token, bundles, []string{audience})
	if err != nil {
		return fmt.Errorf("ParseAndValidate: %w", err)
	}
	domains := make([]string, 0, bundles.Len())
	for _, bundle := range bundles.Bundles() {
		domains = append(domains, bundle.TrustDomain().Name())
	}
	out := describeJWT(svid, false)
	return emit(map[string]any{"id": out.ID, "audience": out.Audience, "trust_domains": sorted(domains)})
}
