package migrate

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/cryo-hpc/cryo/internal/store"
	"github.com/cryo-hpc/cryo/internal/wire"
)

// A standby is a destination kept up to date while the job runs at its
// source (cryo run --standby): the newest generation first, then each new
// one, of which only the chunks the standby lacks travel. If the source
// goes silent, the standby holds every generation the source committed
// but the one it was sending, and the job resumes there.
//
//	source                                   standby
//	hello {job, standby, key}           ->
//	                                    <-   welcome
//	generation offer (chunk names)      ->
//	                                    <-   need (the names it lacks)
//	blobs, then the manifest            ->   committed as the same generation
//	                                    <-   generation ack
//	ping (when idle), bye (job over)    ->
const (
	kindOffer    uint16 = 11 // src -> dst: offer (JSON)
	kindNeed     uint16 = 12 // dst -> src: need (JSON)
	kindBlob     uint16 = 13 // src -> dst: u32 header length | header | blob
	kindManifest uint16 = 14 // src -> dst: u8 last | a piece of the manifest as stored
	kindGenAck   uint16 = 15 // dst -> src: genAck (JSON)
	kindPing     uint16 = 16 // src -> dst: {}
	kindBye      uint16 = 17 // src -> dst: bye (JSON)
)

// Timing of a standby stream.
const (
	pingEvery = 2 * time.Second
	// SilenceLimit is how long a standby waits for its source before it
	// takes the source for lost.
	SilenceLimit = 15 * time.Second
	// offerBatch bounds the chunk names of one offer message.
	offerBatch = 50000
	// manifestPiece bounds a piece of a manifest (one can be larger than
	// a message); maxManifest bounds the whole.
	manifestPiece = 8 << 20
	maxManifest   = 128 << 20
)

type offer struct {
	Generation int      `json:"generation"`
	Chunks     []string `json:"chunks"`
	Last       bool     `json:"last"`           // the last batch of this generation's names
	Keep       []int    `json:"keep,omitempty"` // the source's generations (with Last)
}

type need struct {
	Chunks []string `json:"chunks"`
}

type genAck struct {
	Generation int `json:"generation"`
}

type bye struct {
	Reason string `json:"reason"`
}

// StandbyOptions are the choices of a job's source for its standby.
type StandbyOptions struct {
	Addr  string
	Key   []byte
	Store string // the job's store
	// Job is the caller's description of the job (as SendOptions.Job).
	Job json.RawMessage
	// Report is told how the standby fares (kind "standby" when a
	// generation reached it, "standby-failed" when it could not be kept up
	// to date); it is called from the standby's goroutine.
	Report func(kind, detail string, gen int)
	Logger *slog.Logger
}

// Standby keeps a standby node up to date from a job's source. Its
// failures never touch the job: the standby falls behind, is reported,
// and is connected again.
type Standby struct {
	o      StandbyOptions
	notify chan int
	stop   chan string
	done   chan struct{}

	mu   sync.Mutex
	sent int // newest generation the standby acknowledged
}

// StartStandby connects to the standby in the background and sends it the
// store's newest generation, then each one Notify names.
func StartStandby(ctx context.Context, o StandbyOptions) *Standby {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Report == nil {
		o.Report = func(string, string, int) {}
	}
	s := &Standby{o: o, notify: make(chan int, 1), stop: make(chan string, 1), done: make(chan struct{})}
	go s.run(ctx)
	return s
}

// Notify says generation gen is committed.
func (s *Standby) Notify(gen int) {
	select {
	case s.notify <- gen:
	default:
		// One is pending: the newest generation is sent then anyway.
	}
}

// Sent is the newest generation the standby holds.
func (s *Standby) Sent() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sent
}

// Close tells the standby the job is over here (reason: completed,
// migrated, stopped), so that it does not take it over, and waits a
// little for that to go out.
func (s *Standby) Close(reason string) {
	s.stop <- reason
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
	}
}

func (s *Standby) run(ctx context.Context) {
	defer close(s.done)
	backoff := time.Second
	for {
		c, err := s.connect(ctx)
		if err == nil {
			backoff = time.Second
			var reason string
			reason, err = s.serve(ctx, c)
			if reason != "" {
				_ = c.SendJSON(kindBye, bye{Reason: reason})
				c.Close()
				return
			}
			c.Close()
		}
		s.o.Report("standby-failed", fmt.Sprintf("%s: %v; trying again in %s", s.o.Addr, err, backoff), 0)
		select {
		case <-ctx.Done():
			return
		case <-s.stop:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Minute)
	}
}

func (s *Standby) connect(ctx context.Context) (*wire.Conn, error) {
	st, err := store.Open(s.o.Store)
	if err != nil {
		return nil, err
	}
	key, err := st.KeyHex()
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	c, err := wire.Dial(dctx, s.o.Addr, s.o.Key)
	cancel()
	if err != nil {
		return nil, err
	}
	if err := c.SendJSON(kindHello, hello{Version: Version, Job: s.o.Job, Standby: true, StoreKey: key}); err != nil {
		c.Close()
		return nil, err
	}
	var w welcome
	if err := recvWithin(c, time.Minute, kindWelcome, &w); err != nil {
		c.Close()
		return nil, err
	}
	s.mu.Lock()
	s.sent = 0 // a new connection: the standby says what it has by what it needs
	s.mu.Unlock()
	return c, nil
}

// serve sends generations until the job is over here (its reason) or the
// connection fails.
func (s *Standby) serve(ctx context.Context, c *wire.Conn) (string, error) {
	// What the store holds now, then each generation Notify names (the
	// first checkpoint after a failed connection is pending there).
	if err := s.sendNewest(ctx, c); err != nil {
		return "", err
	}
	for {
		select {
		case <-ctx.Done():
			return "stopped", nil
		case reason := <-s.stop:
			return reason, nil
		case <-s.notify:
			if err := s.sendNewest(ctx, c); err != nil {
				return "", err
			}
		case <-time.After(pingEvery):
			if err := c.SendJSON(kindPing, struct{}{}); err != nil {
				return "", err
			}
		}
	}
}

// sendNewest sends the store's newest generation if the standby lacks it.
func (s *Standby) sendNewest(ctx context.Context, c *wire.Conn) error {
	st, err := store.Open(s.o.Store)
	if err != nil {
		return err
	}
	unlock, err := st.Lock(ctx, false)
	if err != nil {
		return err
	}
	defer unlock()
	gens, err := st.Generations()
	if err != nil || len(gens) == 0 {
		return err
	}
	gen := gens[len(gens)-1]
	if gen <= s.Sent() {
		return nil
	}
	m, err := st.ReadManifest(gen)
	if err != nil {
		return err
	}
	names, err := st.GenerationChunks(m)
	if err != nil {
		return err
	}
	var missing []string
	for i := 0; i == 0 || i < len(names); i += offerBatch {
		batch := names[i:min(i+offerBatch, len(names))]
		last := i+offerBatch >= len(names)
		o := offer{Generation: gen, Chunks: batch, Last: last}
		if last {
			o.Keep = gens
		}
		if err := c.SendJSON(kindOffer, o); err != nil {
			return err
		}
		var n need
		if err := recvWithin(c, time.Minute, kindNeed, &n); err != nil {
			return err
		}
		missing = append(missing, n.Chunks...)
	}
	var buf []byte
	var sent int64
	for _, name := range missing {
		err := st.ExportBlob(name, func(header, blob []byte) error {
			buf = binary.LittleEndian.AppendUint32(buf[:0], uint32(len(header)))
			buf = append(append(buf, header...), blob...)
			sent += int64(len(blob))
			return c.Send(kindBlob, buf)
		})
		if err != nil {
			return fmt.Errorf("chunk %s: %w", name, err)
		}
	}
	mb, err := st.ManifestBytes(gen)
	if err != nil {
		return err
	}
	for i := 0; i == 0 || i < len(mb); i += manifestPiece {
		piece := mb[i:min(i+manifestPiece, len(mb))]
		last := byte(0)
		if i+manifestPiece >= len(mb) {
			last = 1
		}
		if err := c.Send(kindManifest, append([]byte{last}, piece...)); err != nil {
			return err
		}
	}
	var ack genAck
	if err := recvWithin(c, 10*time.Minute, kindGenAck, &ack); err != nil {
		return err
	}
	if ack.Generation != gen {
		return fmt.Errorf("the standby committed generation %d for %d", ack.Generation, gen)
	}
	s.mu.Lock()
	s.sent = gen
	s.mu.Unlock()
	s.o.Report("standby", fmt.Sprintf("generation %d at %s: %d of %d chunks sent (%.1f MiB)", gen, s.o.Addr, len(missing), len(names), float64(sent)/(1<<20)), gen)
	return nil
}

// receiveStandby keeps st in step with a source's generations until the
// source says the job is over (nil) or goes silent or away (the error).
func receiveStandby(ctx context.Context, c *wire.Conn, st *store.Store, h hello, log *slog.Logger) (int, string, error) {
	newest := 0
	if gens, err := st.Generations(); err == nil && len(gens) > 0 {
		newest = gens[len(gens)-1]
	}
	for {
		_ = c.SetDeadline(time.Now().Add(SilenceLimit))
		kind, b, err := c.Recv()
		if err != nil {
			return newest, "", fmt.Errorf("the source went away: %w", err)
		}
		if err := ctx.Err(); err != nil {
			return newest, "", err
		}
		switch kind {
		case kindPing:
		case kindBye:
			var y bye
			_ = json.Unmarshal(b, &y)
			log.Info("the source ends the standby stream", "reason", y.Reason)
			return newest, y.Reason, nil
		case kindOffer:
			var o offer
			if err := json.Unmarshal(b, &o); err != nil {
				return newest, "", err
			}
			gen, err := importGeneration(ctx, c, st, h.StoreKey, o)
			if err != nil {
				_ = c.SendError(err.Error())
				return newest, "", fmt.Errorf("generation %d: %w", o.Generation, err)
			}
			newest = gen
		default:
			return newest, "", fmt.Errorf("unexpected message %d from the source", kind)
		}
	}
}

// importGeneration takes one generation whose first offer batch is o.
func importGeneration(ctx context.Context, c *wire.Conn, st *store.Store, key string, o offer) (int, error) {
	im, err := st.NewImporter(ctx, key)
	if err != nil {
		return 0, err
	}
	defer im.Close()
	for {
		miss, err := im.Missing(o.Chunks)
		if err != nil {
			return 0, err
		}
		if err := c.SendJSON(kindNeed, need{Chunks: miss}); err != nil {
			return 0, err
		}
		if o.Last {
			break
		}
		if err := recvWithin(c, SilenceLimit, kindOffer, &o); err != nil {
			return 0, err
		}
	}
	var manifest []byte
	for {
		_ = c.SetDeadline(time.Now().Add(SilenceLimit))
		kind, b, err := c.Recv()
		if err != nil {
			return 0, err
		}
		switch kind {
		case kindBlob:
			if len(b) < 4 {
				return 0, errors.New("blob message: short")
			}
			n := int(binary.LittleEndian.Uint32(b))
			if n > len(b)-4 {
				return 0, errors.New("blob message: header length past its end")
			}
			if err := im.Put(b[4:4+n], b[4+n:]); err != nil {
				return 0, err
			}
		case kindManifest:
			if len(b) < 1 || len(manifest)+len(b)-1 > maxManifest {
				return 0, errors.New("manifest message: empty, or the manifest too large")
			}
			manifest = append(manifest, b[1:]...)
			if b[0] == 0 {
				continue
			}
			gen, err := im.Commit(manifest)
			if err != nil {
				return 0, err
			}
			if err := c.SendJSON(kindGenAck, genAck{Generation: gen}); err != nil {
				return 0, err
			}
			// The standby keeps what the source keeps.
			if removed, err := im.Retain(o.Keep); err == nil && len(removed) > 0 {
				_, _ = im.GC()
			}
			return gen, nil
		default:
			return 0, fmt.Errorf("unexpected message %d in a generation", kind)
		}
	}
}
