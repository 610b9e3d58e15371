package criu

import (
	"slices"
	"testing"
)

func TestCuts(t *testing.T) {
	ps := PageSize
	const W = 512 << 10
	tests := []struct {
		name string
		runs []PageRun
		want []int64
	}{
		{"none", nil, nil},
		{"run inside one window", []PageRun{{Vaddr: 0x400000, Offset: 0, Pages: 4}}, []int64{0}},
		{"run ending on a window boundary", []PageRun{{Vaddr: 0x400000, Offset: 0, Pages: W / ps}}, []int64{0}},
		{"run crossing windows, aligned", []PageRun{{Vaddr: 0x400000, Offset: 0, Pages: 3 * W / ps}},
			[]int64{0, W, 2 * W}},
		{"run crossing windows, unaligned", []PageRun{{Vaddr: 0x400000 + 3*ps, Offset: 0, Pages: W / ps}},
			[]int64{0, int64(W - 3*ps)}},
		{"several runs, at their offsets", []PageRun{
			{Vaddr: 0x7f0000000000, Offset: 8 * int64(ps), Pages: 2},
			{Vaddr: 0x400000 + W - ps, Offset: 0, Pages: 8},
		}, []int64{0, int64(ps), 8 * int64(ps)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Cuts(tc.runs, W)
			if !slices.Equal(got, tc.want) {
				t.Errorf("Cuts = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestCutsFollowAddresses checks the property the store relies on: the
// same memory yields the same cuts, relative to where it sits in the pages
// image, whatever precedes it.
func TestCutsFollowAddresses(t *testing.T) {
	const W = 512 << 10
	heap := PageRun{Vaddr: 0x1000000 + 5*PageSize, Pages: 3 * W / PageSize}
	alone := Cuts([]PageRun{heap}, W)

	shift := int64(7 * PageSize)
	grown := Cuts([]PageRun{{Vaddr: 0x400000, Offset: 0, Pages: 7}, {Vaddr: heap.Vaddr, Offset: shift, Pages: heap.Pages}}, W)
	if grown[0] != 0 {
		t.Fatalf("cuts %v do not start with the first run", grown)
	}
	var rel []int64
	for _, c := range grown[1:] {
		rel = append(rel, c-shift)
	}
	if !slices.Equal(rel, alone) {
		t.Errorf("the same memory after a new run is cut at %v (relative), alone at %v", rel, alone)
	}
}

func TestIsPages(t *testing.T) {
	for name, want := range map[string]bool{
		"pages-1.img":        true,
		"tree1/pages-12.img": true,
		"pagemap-1.img":      false,
		"core-1.img":         false,
		"pages-1.img.tmp":    false,
		"dump.log":           false,
	} {
		if got := IsPages(name); got != want {
			t.Errorf("IsPages(%q) = %v, want %v", name, got, want)
		}
	}
}
