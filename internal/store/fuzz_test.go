package store

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// sealedSeed is a manifest as cryo writes it, for the fuzzers' corpus.
func sealedSeed(f *testing.F) []byte {
	m := &Manifest{Format: FormatVersion, Generation: 3, Host: "node7", CreatedBy: "cryo test",
		Job: Job{RootPID: 42, Processes: []Process{{PID: 42, PPID: 1, Threads: 2, TIDs: []int{42, 43}, Comm: "solver"}}}}
	for _, name := range []string{"core-42.img", "pages-1.img"} {
		fl := File{Name: name, Kind: "image", Mode: 0o600}
		for i := range 3 {
			c := Chunk{Len: int64(4096 * (i + 1)), Zero: true} // format 3: zero chunks have no name
			if i == 1 {
				c = Chunk{Hash: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", Len: 8192, Stored: 100,
					Check: "60303ae22b998861"}
			}
			fl.Chunks = append(fl.Chunks, c)
			fl.Size += c.Len
		}
		fl.Digest = fileDigest(fl.Chunks)
		m.Files = append(m.Files, fl)
	}
	b, err := m.seal()
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzParseManifest: any bytes in manifest.json are either refused or give
// a manifest that seals again to one that parses to the same thing.
func FuzzParseManifest(f *testing.F) {
	seed := sealedSeed(f)
	f.Add(seed)
	f.Add(seed[:len(seed)/2])
	f.Add([]byte("{}"))
	f.Add(bytes.Replace(seed, []byte(`"n":8192`), []byte(`"n":8193`), 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseManifest(b)
		if err != nil {
			return
		}
		checkSane(t, m)
		again, err := m.seal()
		if err != nil {
			t.Fatal(err)
		}
		m2, err := parseManifest(again)
		if err != nil {
			t.Fatalf("a manifest that parsed does not parse once sealed again: %v", err)
		}
		j1, _ := json.Marshal(m)
		j2, _ := json.Marshal(m2)
		if !bytes.Equal(j1, j2) {
			t.Fatalf("sealing changed the manifest:\n%s\n%s", j1, j2)
		}
	})
}

// FuzzManifestFields fuzzes what a manifest says rather than its bytes:
// the body is sealed with valid checksums and digests, so that every check
// past them is reached. Whatever it says, parsing ends quickly, and what
// it accepts names chunks by hash only, with sane sizes.
func FuzzManifestFields(f *testing.F) {
	f.Add(sealedSeed(f))
	f.Add([]byte(`{"format":1,"files":[{"name":"x","size":1099511627776,"chunks":[{"h":"","n":1099511627776,"0":true}]}]}`))
	f.Add([]byte(`{"format":1,"files":[{"name":"../x","size":5,"chunks":[{"h":"../../../../etc/passwd","n":5,"z":5}]}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		var m Manifest
		if json.Unmarshal(body, &m) != nil {
			return
		}
		m.Format = FormatVersion
		for i := range m.Files {
			m.Files[i].Digest = fileDigest(m.Files[i].Chunks)
		}
		b, err := m.seal()
		if err != nil {
			return
		}
		if got, err := parseManifest(b); err == nil {
			checkSane(t, got)
		}
	})
}

func checkSane(t *testing.T, m *Manifest) {
	t.Helper()
	for _, f := range m.Files {
		var size int64
		if validImageName(f.Name) != nil {
			t.Fatalf("accepted file name %q", f.Name)
		}
		for _, c := range f.Chunks {
			named := validHash(c.Hash) || c.Zero && m.Format >= 3 && c.Hash == ""
			if !named || c.Len < 0 || c.Len > MaxChunk || c.Stored < 0 {
				t.Fatalf("accepted chunk %+v of %s", c, f.Name)
			}
			size += c.Len
		}
		if size != f.Size {
			t.Fatalf("accepted %s: %d bytes of chunks for a file of %d", f.Name, size, f.Size)
		}
		if f.Kind != "pages" && f.Size > MaxImage {
			t.Fatalf("accepted image %s of %d bytes", f.Name, f.Size)
		}
	}
	for _, tr := range m.Job.Trees {
		if validImageName(tr) != nil || strings.Contains(tr, "/") {
			t.Fatalf("accepted tree name %q", tr)
		}
	}
}
