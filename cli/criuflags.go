package cli

import (
	"errors"
	"strconv"
	"strings"

	"github.com/cryo-hpc/cryo/internal/criu"
	ucli "github.com/urfave/cli/v2"
)

// criuLimits are the flags that hand CRIU's own limits and options
// through: --ghost-limit (commands that dump) and --criu-config.
type criuLimits struct {
	ghostLimit string
	config     string
}

// flags returns --criu-config, and --ghost-limit when the command dumps
// (CRIU applies the ghost limit only to dumps: a restore brings back
// whatever the images hold).
func (l *criuLimits) flags(dumps bool) []ucli.Flag {
	fs := []ucli.Flag{
		&ucli.StringFlag{Name: "criu-config", Usage: "a CRIU configuration file (CRIU's syntax: one long option per line) for what cryo has no flag for; as root it must be root's alone", Destination: &l.config, EnvVars: []string{"CRYO_CRIU_CONFIG"}},
	}
	if dumps {
		fs = append(fs, &ucli.StringFlag{Name: "ghost-limit", Usage: "largest deleted file the job holds open (shared memory an MPI library unlinked, say) whose contents a checkpoint keeps: bytes, or with K, M or G (default: CRIU's 1M)", Destination: &l.ghostLimit, EnvVars: []string{"CRYO_GHOST_LIMIT"}})
	}
	return fs
}

// parse checks the flags: the ghost limit in bytes (0: CRIU's default)
// and the configuration file's absolute path ("" for none).
func (l *criuLimits) parse() (uint32, string, error) {
	var limit uint32
	if l.ghostLimit != "" {
		n, err := parseSize(l.ghostLimit)
		if err != nil {
			return 0, "", usagef("--ghost-limit: %v", err)
		}
		if n > 1<<32-1 {
			return 0, "", usagef("--ghost-limit: %s is more than CRIU takes (4G less one byte)", l.ghostLimit)
		}
		limit = uint32(n)
	}
	conf, err := criu.ConfigFile(l.config)
	if err != nil {
		return 0, "", usagef("--criu-config: %v", err)
	}
	return limit, conf, nil
}

// parseSize reads a size as CRIU writes one: a number of bytes, or of
// KiB, MiB or GiB with the suffix K, M or G (either case), which may be
// spelt out as cryo prints sizes (KiB, MiB, GiB).
func parseSize(s string) (uint64, error) {
	num, iec := strings.CutSuffix(s, "iB")
	mult := uint64(1)
	if n := len(num); n > 0 {
		switch num[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		}
		if mult > 1 {
			num = num[:n-1]
		}
	}
	v, err := strconv.ParseUint(num, 10, 64)
	if err != nil || strings.TrimSpace(num) != num || num == "" || iec && mult == 1 {
		return 0, errors.New(strconv.Quote(s) + " is not a size (bytes, or a number with K, M or G, or KiB, MiB or GiB)")
	}
	if v > (1<<64-1)/mult {
		return 0, errors.New(strconv.Quote(s) + " is too large")
	}
	return v * mult, nil
}
