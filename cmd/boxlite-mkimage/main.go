// Command boxlite-mkimage writes an OCI image-layout tarball of busybox
// images without a registry or a container engine: one layer with a static
// busybox, a symlink per applet, /etc/passwd and /etc/group, shared by every
// image in the tarball; each image has its own config (Env PATH, Cmd) and
// manifest, named by the io.containerd.image.name annotation so that
//
//	ctr images import --platform linux/amd64 OUT.tar
//
// creates the images under those names. The output is byte-for-byte
// reproducible for the same busybox binary and flags.
//
// Usage:
//
//	boxlite-mkimage -o OUT.tar -image 'docker.io/boxlite/busybox:test=["sh"]' [-image 'NAME=' ...]
//
// The part after '=' is the image's Cmd as a JSON array; empty means no Cmd.
//
// With -critest it writes instead the images cri-tools' CRI validation
// suite (critest) pulls or runs, under their upstream names, built from a
// dynamically linked busybox and the boxlite-standin program (see
// critest.go):
//
//	boxlite-mkimage -o OUT.tar -critest -busybox DYNAMIC_BUSYBOX -standin BOXLITE_STANDIN
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// imageFlag is one -image NAME=CMD flag.
type imageFlag struct {
	// name is the full reference, e.g. docker.io/boxlite/busybox:test.
	name string
	// cmd is the image config's Cmd; nil for none.
	cmd []string
}

// imageFlags collects repeated -image flags.
type imageFlags []imageFlag

func (f *imageFlags) String() string { return fmt.Sprint(*f) }

// Set parses NAME=CMD, CMD being a JSON array of strings or empty.
func (f *imageFlags) Set(v string) error {
	name, cmdJSON, ok := strings.Cut(v, "=")
	if !ok || name == "" {
		return errors.New(`want NAME=CMD, e.g. docker.io/boxlite/busybox:test=["sh"]`)
	}
	img := imageFlag{name: name}
	if cmdJSON != "" {
		if err := json.Unmarshal([]byte(cmdJSON), &img.cmd); err != nil {
			return fmt.Errorf("cmd of %s is not a JSON array of strings: %w", name, err)
		}
	}
	*f = append(*f, img)
	return nil
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "boxlite-mkimage:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("boxlite-mkimage", flag.ContinueOnError)
	out := fs.String("o", "", "output OCI image-layout tarball")
	busybox := fs.String("busybox", "/bin/busybox", "busybox binary to put in /bin (static; dynamic with -critest)")
	critest := fs.Bool("critest", false, "write critest's test images instead of -image ones")
	standin := fs.String("standin", "", "with -critest: the static boxlite-standin binary")
	var flags imageFlags
	fs.Var(&flags, "image", `an image to write as NAME=CMD (CMD a JSON array, or empty for none); repeatable`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" || fs.NArg() != 0 || *critest == (len(flags) > 0) || *critest != (*standin != "") {
		fs.Usage()
		return errors.New("need -o and either -image flags, or -critest and -standin")
	}
	var images []image
	if *critest {
		var err error
		if images, err = critestImages(*busybox, *standin); err != nil {
			return err
		}
	} else {
		layer, err := busyboxLayer(*busybox)
		if err != nil {
			return err
		}
		for _, f := range flags {
			images = append(images, busyboxImage(f, layer))
		}
	}
	tmp, err := os.CreateTemp(filepath.Dir(*out), ".mkimage-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := writeLayout(tmp, images); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), *out)
}
