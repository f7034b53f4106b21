package image

import (
	"cmp"
	"slices"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/boxlite/boxlite/internal/errclass"
)

// defaultPath is the PATH a process gets when neither the image nor the
// request sets one, as docker gives it.
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Process is what a box runs: a request's overrides going into
// Image.Process, the resolved process coming out.
type Process struct {
	// Args is the command; in a request it replaces the image's Cmd.
	Args []string
	// Env is KEY=VALUE entries; in a request they are added to the
	// image's, replacing those with the same key.
	Env []string
	// Cwd is the working directory; in a request it replaces the image's
	// WorkingDir.
	Cwd string
	// User is the user (name, uid, uid:gid, ...); in a request it
	// replaces the image's User.
	User string
}

// Process applies the image's config to a request as docker run does: the
// command is the image's Entrypoint followed by req.Args if given, else by
// the image's Cmd; the environment is the image's Env then req.Env, a later
// entry replacing an earlier one with the same key in place, plus a default
// PATH if neither sets one; the working directory and user default to the
// image's WorkingDir ("/" if it has none) and User. An image and a request
// that give no command at all are errdefs.ErrInvalidArgument.
func (i Image) Process(req Process) (Process, error) {
	cmd := i.Config.Cmd
	if len(req.Args) > 0 {
		cmd = req.Args
	}
	out := Process{
		Args: slices.Concat(i.Config.Entrypoint, cmd),
		Env:  mergeEnv(i.Config.Env, req.Env),
		Cwd:  cmp.Or(req.Cwd, i.Config.WorkingDir, "/"),
		User: cmp.Or(req.User, i.Config.User),
	}
	if len(out.Args) == 0 {
		return Process{}, errclass.Errorf(errdefs.ErrInvalidArgument, "image %s has no command: give one", i.Name)
	}
	return out, nil
}

// mergeEnv returns base with each entry of over replacing the entry with
// its key, or appended, and a default PATH appended if none is set.
func mergeEnv(base, over []string) []string {
	out := slices.Clone(base)
	for _, kv := range over {
		if j := slices.IndexFunc(out, func(e string) bool { return envKey(e) == envKey(kv) }); j >= 0 {
			out[j] = kv
		} else {
			out = append(out, kv)
		}
	}
	if !slices.ContainsFunc(out, func(e string) bool { return envKey(e) == "PATH" }) {
		out = append(out, defaultPath)
	}
	return out
}

// envKey is the key of a KEY=VALUE entry (the whole entry if it has no =).
func envKey(kv string) string {
	k, _, _ := strings.Cut(kv, "=")
	return k
}
