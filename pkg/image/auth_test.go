package image

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"
)

func TestCredentialsComeFromTheDockerConfigAuths(t *testing.T) {
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	path := filepath.Join(t.TempDir(), "config.json")
	cfg := `{"auths": {
		"https://index.docker.io/v1/": {"auth": "` + b64("hub:hubpass") + `"},
		"registry.example.com:5000": {"auth": "` + b64("ex:pa:ss") + `"},
		"http://127.0.0.1:5001/v2/": {"username": "u", "password": "p"}
	}}`
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ host, user, password string }{
		{"registry-1.docker.io", "hub", "hubpass"},
		{"docker.io", "hub", "hubpass"},
		{"registry.example.com:5000", "ex", "pa:ss"},
		{"127.0.0.1:5001", "u", "p"},
		{"registry.example.com", "", ""},
	}
	for _, tt := range tests {
		user, password, err := credentials(path, tt.host)
		if err != nil || user != tt.user || password != tt.password {
			t.Errorf("credentials(%s) = %q, %q, %v; want %q, %q", tt.host, user, password, err, tt.user, tt.password)
		}
	}
	if u, p, err := credentials(filepath.Join(t.TempDir(), "missing.json"), "docker.io"); err != nil || u != "" || p != "" {
		t.Errorf("credentials without a config file = %q, %q, %v; want none", u, p, err)
	}
	if err := os.WriteFile(path, []byte(`{"auths": {"h": {"auth": "%%%"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := credentials(path, "h"); err == nil {
		t.Error("credentials with a bad auth field: no error")
	}
}
