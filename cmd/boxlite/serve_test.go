package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
	"github.com/boxlite/boxlite/pkg/client"
	"github.com/boxlite/boxlite/pkg/manager"
	"github.com/boxlite/boxlite/pkg/server"
)

func TestListenAddressesAreCheckedBeforeAnythingStarts(t *testing.T) {
	withToken := serveOptions{tokenFile: "/t"}
	withTLS := serveOptions{tokenFile: "/t", tlsCert: "/c", tlsKey: "/k"}
	for _, tt := range []struct {
		addr string
		o    serveOptions
		want string // "" = accepted
	}{
		{"unix:///run/boxlite/boxlite.sock", serveOptions{}, ""},
		{"unix://relative.sock", serveOptions{}, "want unix:///absolute/path.sock"},
		{"tcp://127.0.0.1:8080", serveOptions{}, "needs --token-file"},
		{"tcp://127.0.0.1:8080", withToken, ""},
		{"tcp://localhost:8080", withToken, ""},
		{"tcp://[::1]:8080", withToken, ""},
		{"tcp://0.0.0.0:8080", withToken, "not a loopback address: serving it needs --tls-cert and --tls-key"},
		{"tcp://10.1.2.3:8080", withToken, "not a loopback address"},
		{"tcp://0.0.0.0:8080", withTLS, ""},
		{"tcp://127.0.0.1", withToken, "want tcp://HOST:PORT"},
		{"http://127.0.0.1:80", withToken, "want unix://PATH or tcp://HOST:PORT"},
	} {
		_, err := parseListen(tt.addr, tt.o)
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%s: %v, want accepted", tt.addr, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("%s: %v, want an error with %q", tt.addr, err, tt.want)
		}
	}
}

func TestTheUnixSocketIsMode0660(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := listenUnix(sock, "")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want 0660", st.Mode().Perm())
	}
	if _, err := listenUnix(sock, ""); err == nil || !strings.Contains(err.Error(), "another daemon is serving it") {
		t.Errorf("second listener on a live socket: %v", err)
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "boxlite test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestATLSListenerServesWithTheToken(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, pool := selfSigned(t, dir)
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600)
	o := serveOptions{tokenFile: tokenFile, tlsCert: certFile, tlsKey: keyFile}
	u, err := parseListen("tcp://127.0.0.1:0", o)
	if err != nil {
		t.Fatal(err)
	}
	l, err := listen(u, o)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := manager.NewService(manager.ServiceConfig{Config: manager.Config{StateRoot: filepath.Join(shortDir(t), "st"), ShimBinary: "/bin/true"}})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	srv := server.New(svc)
	go srv.Serve(l)
	defer srv.Shutdown(context.Background())
	url := "https://" + l.Addr().String()
	ctx := context.Background()
	good, _ := client.New(url, client.Options{Token: "s3cret", TLS: &tls.Config{RootCAs: pool}})
	if boxes, err := good.List(ctx, api.ListFilter{}); err != nil || len(boxes) != 0 {
		t.Errorf("list over TLS with the token: %v %v", boxes, err)
	}
	bad, _ := client.New(url, client.Options{Token: "wrong", TLS: &tls.Config{RootCAs: pool}})
	if _, err := bad.List(ctx, api.ListFilter{}); err == nil || !strings.Contains(err.Error(), "wrong bearer token") {
		t.Errorf("wrong token: %v", err)
	}
	untrusting, _ := client.New(url, client.Options{Token: "s3cret"})
	if _, err := untrusting.List(ctx, api.ListFilter{}); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a client that does not trust the certificate: %v", err)
	}
}

// shortDir is a temporary directory with a path short enough for the
// state directory's sockets.
func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("/tmp", "bx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}
