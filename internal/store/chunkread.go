package store

// ReadChunk reads, decompresses and verifies one chunk (zero chunks come
// back as zeros without touching the disk).
func (s *Store) ReadChunk(c Chunk) ([]byte, error) {
	if c.Zero {
		return make([]byte, c.Len), nil
	}
	return s.readChunk(c, nil, false)
}
