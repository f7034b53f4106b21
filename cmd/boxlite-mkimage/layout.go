package main

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	digest "github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// defaultPath is the PATH every image's config sets (the one Docker and
// containerd use for Linux images).
const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// refNameAnnotation is what containerd reads for an image's full name on
// import; the OCI ref name annotation carries the tag alone.
const refNameAnnotation = "io.containerd.image.name"

// layoutWriter writes an OCI image layout into a tarball, each blob once.
type layoutWriter struct {
	tw *tar.Writer
	// written holds the digests already in the tarball.
	written map[digest.Digest]bool
}

// blob writes data under blobs/sha256/ and returns its descriptor.
func (w *layoutWriter) blob(mediaType string, data []byte) (ocispec.Descriptor, error) {
	d := digest.FromBytes(data)
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: d, Size: int64(len(data))}
	if w.written[d] {
		return desc, nil
	}
	w.written[d] = true
	return desc, w.file("blobs/sha256/"+d.Encoded(), data)
}

// file writes one regular file.
func (w *layoutWriter) file(name string, data []byte) error {
	if err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644,
		Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return err
	}
	_, err := w.tw.Write(data)
	return err
}

// image is one image of a layout.
type image struct {
	// names are the full references the image is imported under; each
	// gets its own index entry pointing at the one manifest.
	names []string
	// config is the image's runtime configuration.
	config ocispec.ImageConfig
	// layers are the image's layers, bottom first; layers shared by
	// several images are written once.
	layers []layer
}

// busyboxImage is the image of one -image flag: the shared busybox layer
// and the flag's Cmd.
func busyboxImage(img imageFlag, l layer) image {
	return image{
		names:  []string{img.name},
		config: ocispec.ImageConfig{Env: []string{defaultPath}, Cmd: img.cmd, WorkingDir: "/"},
		layers: []layer{l},
	}
}

// writeLayout writes the layout: per image its layers, config and manifest,
// then index.json naming them and the oci-layout marker.
func writeLayout(out io.Writer, images []image) error {
	w := &layoutWriter{tw: tar.NewWriter(out), written: map[digest.Digest]bool{}}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	index := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	for _, img := range images {
		desc, err := w.image(img)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.names[0], err)
		}
		for _, name := range img.names {
			named := desc
			named.Annotations = map[string]string{refNameAnnotation: name, ocispec.AnnotationRefName: tagOf(name)}
			index.Manifests = append(index.Manifests, named)
		}
	}
	if err := w.json("index.json", index); err != nil {
		return err
	}
	if err := w.json(ocispec.ImageLayoutFile, ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion}); err != nil {
		return err
	}
	return w.tw.Close()
}

// image writes one image's layers, config and manifest and returns the
// manifest's descriptor, with the image's platform.
func (w *layoutWriter) image(img image) (ocispec.Descriptor, error) {
	created := epoch
	cfg := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config:   img.config,
		RootFS:   ocispec.RootFS{Type: "layers"},
	}
	var layerDescs []ocispec.Descriptor
	for _, l := range img.layers {
		desc, err := w.blob(ocispec.MediaTypeImageLayerGzip, l.gz)
		if err != nil {
			return ocispec.Descriptor{}, err
		}
		layerDescs = append(layerDescs, desc)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, digest.Digest(l.diffID))
		cfg.History = append(cfg.History, ocispec.History{Created: &created, CreatedBy: "boxlite-mkimage: " + l.createdBy})
	}
	cfgData, err := json.Marshal(cfg)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	cfgDesc, err := w.blob(ocispec.MediaTypeImageConfig, cfgData)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: cfgDesc, Layers: layerDescs,
	}
	mData, err := json.Marshal(m)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc, err := w.blob(ocispec.MediaTypeImageManifest, mData)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc.Platform = &ocispec.Platform{Architecture: "amd64", OS: "linux"}
	return desc, nil
}

// json writes v as a JSON file.
func (w *layoutWriter) json(name string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return w.file(name, data)
}

// tagOf returns the tag of a reference, or "latest".
func tagOf(ref string) string {
	name := ref
	if i := strings.LastIndexByte(ref, '/'); i >= 0 {
		name = ref[i+1:]
	}
	if i := strings.LastIndexByte(name, ':'); i >= 0 {
		return name[i+1:]
	}
	return "latest"
}
