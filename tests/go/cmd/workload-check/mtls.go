package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// maxLine bounds the one line each side reads from the other.
const maxLine = 4096

// authorizeFlag parses -authorize into an ID authorizer.
func authorizeFlag(name, raw string) (tlsconfig.Authorizer, error) {
	id, err := spiffeid.FromString(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: -authorize: %w", name, err)
	}
	return tlsconfig.AuthorizeID(id), nil
}

// readLine reads one line of at most maxLine bytes.
func readLine(conn net.Conn) (string, error) {
	line, err := bufio.NewReaderSize(conn, maxLine).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(line, "\n"), nil
}

// peerID is the SPIFFE ID of a spiffetls connection's peer.
func peerID(conn net.Conn) (string, error) {
	withPeer, ok := conn.(interface{ PeerID() (spiffeid.ID, error) })
	if !ok {
		return "", errors.New("not a spiffetls connection")
	}
	id, err := withPeer.PeerID()
	if err != nil {
		return "", err
	}
	return id.String(), nil
}

// serve listens with spiffetls (mTLS, its SVID from the Workload API,
// peers authorized by -authorize), prints its address, then for each
// connection reads one line, answers with its own line, and prints a JSON
// object: the peer's ID and line, or the error. It runs until killed.
func serve(args []string) error {
	var c common
	var listen, authorize string
	fs := newFlags("serve", &c)
	fs.StringVar(&listen, "listen", "127.0.0.1:0", "the TCP address to listen on")
	fs.StringVar(&authorize, "authorize", "", "the only client SPIFFE ID accepted")
	if err := c.parse(fs, args); err != nil {
		return err
	}
	authorizer, err := authorizeFlag("serve", authorize)
	if err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	listener, err := spiffetls.ListenWithMode(ctx, "tcp", listen,
		spiffetls.MTLSServerWithSourceOptions(authorizer, c.sourceOptions()))
	if err != nil {
		return fmt.Errorf("spiffetls listen on %s: %w", listen, err)
	}
	defer listener.Close()
	if _, err := fmt.Println(listener.Addr().String()); err != nil {
		return err
	}
	for {
		conn, err := listener.Accept()
		if err != nil {
			return fmt.Errorf("accepting: %w", err)
		}
		if err := emit(answer(conn)); err != nil {
			return err
		}
	}
}

// answer serves one connection and says how it went.
func answer(conn net.Conn) map[string]string {
	defer conn.Close()
	line, err := readLine(conn)
	if err != nil {
		return map[string]string{"error": err.Error()}
	}
	peer, err := peerID(conn)
	if err != nil {
		return map[string]string{"error": err.Error()}
	}
	if _, err := fmt.Fprintf(conn, "hello %s\n", peer); err != nil {
		return map[string]string{"error": err.Error()}
	}
	return map[string]string{"peer": peer, "line": line}
}

// dial connects to -addr with spiffetls (mTLS, its SVID from the Workload
// API, the server authorized by -authorize), sends a line, and prints the
// server's ID and answer.
func dial(args []string) error {
	var c common
	var addr, authorize string
	fs := newFlags("dial", &c)
	fs.StringVar(&addr, "addr", "", "the server's TCP address")
	fs.StringVar(&authorize, "authorize", "", "the only server SPIFFE ID accepted")
	if err := c.parse(fs, args); err != nil {
		return err
	}
	authorizer, err := authorizeFlag("dial", authorize)
	if err != nil {
		return err
	}
	ctx, cancel := c.context()
	defer cancel()
	conn, err := spiffetls.DialWithMode(ctx, "tcp", addr,
		spiffetls.MTLSClientWithSourceOptions(authorizer, c.sourceOptions()))
	if err != nil {
		return fmt.Errorf("spiffetls dial %s: %w", addr, err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return err
		}
	}
	if _, err := fmt.Fprintln(conn, "ping"); err != nil {
		return fmt.Errorf("writing to %s: %w", addr, err)
	}
	reply, err := readLine(conn)
	if err != nil {
		return fmt.Errorf("reading from %s: %w", addr, err)
	}
	server, err := peerID(conn)
	if err != nil {
		return err
	}
	return emit(map[string]string{"server": server, "reply": reply})
}
