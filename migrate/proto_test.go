package migrate

import (
	"bytes"
	"strings"
	"testing"
)

func TestPagesMessageRoundTrip(t *testing.T) {
	data := bytes.Repeat([]byte{7}, 3*PageSize)
	b := appendPages(nil, pageHeader{name: "pagemap-12.img", pages: 3, addr: 0x7f0000001000}, data)
	h, got, err := parsePages(b)
	if err != nil || h.name != "pagemap-12.img" || h.pages != 3 || h.addr != 0x7f0000001000 || h.zero || !bytes.Equal(got, data) {
		t.Fatalf("round trip: %+v %v", h, err)
	}
	b = appendPages(nil, pageHeader{zero: true, name: "pagemap-shmem-99.img", pages: 256, addr: 0}, nil)
	if h, got, err := parsePages(b); err != nil || !h.zero || len(got) != 0 || h.pages != 256 {
		t.Fatalf("zero run: %+v %v", h, err)
	}
}

// What a source sends is bounded and named before the destination uses
// it: no name that escapes its directory, no oversized run.
func TestPagesMessageRefusals(t *testing.T) {
	page := make([]byte, PageSize)
	for _, tc := range []struct {
		name string
		msg  []byte
		want string
	}{
		{"short header", []byte{0, 1, 2}, "short header"},
		{"a path for a name", appendPages(nil, pageHeader{name: "../../etc/x", pages: 1, addr: 0}, page), "bad image name"},
		{"not a pagemap", appendPages(nil, pageHeader{name: "core-1.img", pages: 1, addr: 0}, page), "bad image name"},
		{"too many pages", appendPages(nil, pageHeader{name: "pagemap-1.img", pages: maxRunPages + 1, addr: 0}, bytes.Repeat(page, maxRunPages+1)), "pages"},
		{"no pages", appendPages(nil, pageHeader{name: "pagemap-1.img", pages: 0, addr: 0}, nil), "0 pages"},
		{"unaligned address", appendPages(nil, pageHeader{name: "pagemap-1.img", pages: 1, addr: 12}, page), "address"},
		{"data short of its pages", appendPages(nil, pageHeader{name: "pagemap-1.img", pages: 2, addr: 0}, page), "bytes for 2 pages"},
		{"data with zero pages", append(appendPages(nil, pageHeader{zero: true, name: "pagemap-1.img", pages: 1, addr: 0}, nil), 1), "bytes for 1 pages"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := parsePages(tc.msg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error about %q", err, tc.want)
			}
		})
	}
}

func TestFileMessage(t *testing.T) {
	b := appendFile(nil, "core-1.img", 4096, []byte("abc"))
	name, off, data, err := parseFile(b)
	if err != nil || name != "core-1.img" || off != 4096 || string(data) != "abc" {
		t.Fatalf("round trip: %q %d %q %v", name, off, data, err)
	}
	for _, bad := range []string{"", ".hidden", "../core-1.img", "a/b.img", "tmpfs dev.img", strings.Repeat("x", 201)} {
		if _, _, _, err := parseFile(appendFile(nil, bad, 0, nil)); err == nil {
			t.Errorf("file name %q accepted", bad)
		}
	}
	if _, _, _, err := parseFile(appendFile(nil, "core-1.img", -1, nil)); err == nil {
		t.Error("a negative offset accepted")
	}
	if _, _, _, err := parseFile(appendFile(nil, "core-1.img", 0, make([]byte, maxFilePiece+1))); err == nil {
		t.Error("an oversized piece accepted")
	}
}
