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

// writeLayout writes the layout: the shared layer, then per image its config
// and manifest, then index.json naming them and the oci-layout marker.
func writeLayout(out io.Writer, l layer, images []imageFlag) error {
	w := &layoutWriter{tw: tar.NewWriter(out), written: map[digest.Digest]bool{}}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
	}
	layerDesc, err := w.blob(ocispec.MediaTypeImageLayerGzip, l.gz)
	if err != nil {
		return err
	}
	index := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	for _, img := range images {
		desc, err := w.image(img, l, layerDesc)
		if err != nil {
			return fmt.Errorf("image %s: %w", img.name, err)
		}
		index.Manifests = append(index.Manifests, desc)
	}
	if err := w.json("index.json", index); err != nil {
		return err
	}
	if err := w.json(ocispec.ImageLayoutFile, ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion}); err != nil {
		return err
	}
	return w.tw.Close()
}

// image writes one image's config and manifest and returns the manifest's
// descriptor, annotated with the image's name and platform.
func (w *layoutWriter) image(img imageFlag, l layer, layerDesc ocispec.Descriptor) (ocispec.Descriptor, error) {
	created := epoch
	cfg := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config:   ocispec.ImageConfig{Env: []string{defaultPath}, Cmd: img.cmd, WorkingDir: "/"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.Digest(l.diffID)}},
		History:  []ocispec.History{{Created: &created, CreatedBy: "boxlite-mkimage: busybox-static"}},
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
		Config: cfgDesc, Layers: []ocispec.Descriptor{layerDesc},
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
	desc.Annotations = map[string]string{refNameAnnotation: img.name, ocispec.AnnotationRefName: tagOf(img.name)}
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
