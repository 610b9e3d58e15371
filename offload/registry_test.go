package offload

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// closingDriver is a driver that holds something until closed.
type closingDriver struct {
	kind   string
	closed int
	err    error
}

func (d *closingDriver) Kind() string                                       { return d.kind }
func (d *closingDriver) Discover(context.Context, []int) ([]Context, error) { return nil, nil }
func (d *closingDriver) Attach(Record) (Context, error)                     { return nil, errors.New("none") }
func (d *closingDriver) Inventory(context.Context) (Inventory, error)       { return Inventory{}, nil }
func (d *closingDriver) Close() error                                       { d.closed++; return d.err }

// plainDriver holds nothing: it has no Close.
type plainDriver struct{ closingDriver }

func (plainDriver) Close(int) {} // not an io.Closer

func TestRegistryCloseClosesEveryDriver(t *testing.T) {
	a := &closingDriver{kind: "a"}
	b := &closingDriver{kind: "b", err: errors.New("shutdown failed")}
	c := &closingDriver{kind: "c"}
	reg := NewRegistry(a, &plainDriver{closingDriver{kind: "p"}}, b, c)
	err := reg.Close()
	if err == nil || !strings.Contains(err.Error(), "close the b driver: shutdown failed") {
		t.Errorf("Close: %v, want b's failure named", err)
	}
	if a.closed != 1 || b.closed != 1 || c.closed != 1 {
		t.Errorf("closed a %d, b %d, c %d times; want each once (a failing one does not stop the rest)", a.closed, b.closed, c.closed)
	}
	var none *Registry
	if err := none.Close(); err != nil {
		t.Errorf("Close of a nil registry: %v", err)
	}
}
