package cli

import (
	"github.com/cryo-hpc/cryo"
	ucli "github.com/urfave/cli/v2"
)

// packSizeFlag is --pack-size, for the commands that write pack files
// (checkpoint, gc, run); parsePackSize reads what it binds.
func packSizeFlag(dest *string) ucli.Flag {
	return &ucli.StringFlag{Name: "pack-size", Usage: "close the store's pack files at this size: bytes, or a number with K, M, G or KiB, MiB, GiB; 1MiB to 64GiB (default: 256MiB)", Destination: dest, EnvVars: []string{"CRYO_PACK_SIZE"}}
}

// parsePackSize reads --pack-size: 0 (the library's default) when it is
// not given, else its bytes, or a usage error naming the flag when it is
// not a size or lies outside cryo.MinPackSize to cryo.MaxPackSize.
func parsePackSize(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := parseSize(s)
	if err != nil {
		return 0, usagef("--pack-size: %v", err)
	}
	if n < cryo.MinPackSize || n > cryo.MaxPackSize {
		return 0, usagef("--pack-size: %s is outside 1MiB to 64GiB", s)
	}
	return int64(n), nil
}
