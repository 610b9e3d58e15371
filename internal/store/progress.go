package store

import "sync/atomic"

// Progress counts the bytes a long operation (storing, verifying,
// materializing) has processed, for a caller that shows it. Set it as
// Store.Progress before the operation; it may be read at any time from
// another goroutine. A nil *Progress counts nothing.
type Progress struct {
	done, total atomic.Int64
}

// Add counts n more bytes done.
func (p *Progress) Add(n int64) {
	if p != nil {
		p.done.Add(n)
	}
}

// AddTotal raises the number of bytes the operation will process (0 while
// unknown).
func (p *Progress) AddTotal(n int64) {
	if p != nil {
		p.total.Add(n)
	}
}

// Done is the number of bytes processed so far.
func (p *Progress) Done() int64 {
	if p == nil {
		return 0
	}
	return p.done.Load()
}

// Total is the number of bytes the operation will process, 0 when unknown.
func (p *Progress) Total() int64 {
	if p == nil {
		return 0
	}
	return p.total.Load()
}
