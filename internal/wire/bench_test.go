package wire

import (
	"context"
	"fmt"
	"net"
	"testing"
)

// BenchmarkThroughput sends messages of several sizes from a client to a
// server over a real TCP connection on loopback, the server receiving on
// another goroutine. A 1 GiB transfer:
//
//	go test -run '^$' -bench 'Throughput/1MiB' -benchtime 1024x ./internal/wire/
func BenchmarkThroughput(b *testing.B) {
	for _, size := range []int{64 << 10, 1 << 20, MaxPayload} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			client, server := tcpPair(b, newTestKey(b))
			payload := pattern(1, size)
			received := make(chan error, 1)
			b.SetBytes(int64(size))
			b.ResetTimer()
			go func() {
				for range b.N {
					if _, _, err := server.Recv(); err != nil {
						received <- err
						return
					}
				}
				received <- nil
			}()
			for range b.N {
				if err := client.Send(1, payload); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-received; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkHandshake is the cost of a Dial (TCP connect and handshake)
// over loopback.
func BenchmarkHandshake(b *testing.B) {
	key := newTestKey(b)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if conn, err := Handshake(context.Background(), c, key); err == nil {
				conn.Close()
			}
		}
	}()
	ctx := context.Background()
	for b.Loop() {
		c, err := Dial(ctx, l.Addr().String(), key)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
