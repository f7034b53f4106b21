package image

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// dockerHubHosts are the names Docker Hub's credentials are filed under and
// the hosts they are for.
var dockerHubHosts = []string{"docker.io", "index.docker.io", "registry-1.docker.io"}

// dockerConfigFile is the part of a docker CLI config.json that holds
// registry credentials. Credential stores and helpers (credsStore,
// credHelpers) and identity tokens are not supported.
type dockerConfigFile struct {
	// Auths are the credentials by registry, keyed by host or URL.
	Auths map[string]dockerAuth `json:"auths"`
}

// dockerAuth is one registry's entry in a docker CLI config.json.
type dockerAuth struct {
	// Auth is base64("user:password").
	Auth string `json:"auth"`
	// Username and Password, if set, are used when Auth is empty.
	Username string `json:"username"`
	Password string `json:"password"`
}

// defaultDockerConfig is where the docker CLI keeps its config:
// $DOCKER_CONFIG/config.json, else ~/.docker/config.json.
func defaultDockerConfig() string {
	if dir := os.Getenv("DOCKER_CONFIG"); dir != "" {
		return filepath.Join(dir, "config.json")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".docker", "config.json")
}

// credentials returns the user and password the docker config file at path
// holds for host; empty strings if it holds none or there is no file.
func credentials(path, host string) (user, password string, err error) {
	if path == "" {
		return "", "", nil
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", "", nil
	}
	if err != nil {
		return "", "", err
	}
	var cfg dockerConfigFile
	if err := json.Unmarshal(data, &cfg); err != nil {
		return "", "", fmt.Errorf("read credentials: %s: %w", path, err)
	}
	for key, a := range cfg.Auths {
		if !sameRegistry(authHost(key), host) {
			continue
		}
		if a.Auth == "" {
			return a.Username, a.Password, nil
		}
		raw, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return "", "", fmt.Errorf("read credentials: %s: auths[%q].auth: %w", path, key, err)
		}
		user, password, ok := strings.Cut(string(raw), ":")
		if !ok {
			return "", "", fmt.Errorf("read credentials: %s: auths[%q].auth is not base64(user:password)", path, key)
		}
		return user, password, nil
	}
	return "", "", nil
}

// authHost returns the host of a key of auths, which the docker CLI writes
// as a host ("registry.example.com:5000") or a URL
// ("https://index.docker.io/v1/").
func authHost(key string) string {
	key = strings.TrimPrefix(strings.TrimPrefix(key, "https://"), "http://")
	host, _, _ := strings.Cut(key, "/")
	return host
}

// sameRegistry reports whether hosts a and b are one registry: equal, or
// both names of Docker Hub.
func sameRegistry(a, b string) bool {
	if a == b {
		return true
	}
	return slices.Contains(dockerHubHosts, a) && slices.Contains(dockerHubHosts, b)
}
