// Package criu finds, vets and drives the CRIU binary for the rest of cryo.
//
// It owns: locating CRIU (--criu, then CRYO_CRIU, then PATH), refusing one
// that is too old or fails `criu check`, the translation of cryo's typed
// options into CRIU's RPC options (exactly one place, Options.rpc), running
// `criu swrk` with the fds it must inherit, and turning a failed CRIU log
// into an error a person can act on.
//
// It must not touch the store or know about offload contexts: callers hand
// it an images directory and get back CRIU's verdict.
package criu
