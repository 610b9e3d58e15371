// Package criu finds, vets and drives the CRIU binary for the rest of cryo.
//
// It owns: locating CRIU (--criu, then CRYO_CRIU, then PATH), refusing one
// that is too old or fails `criu check`, the translation of cryo's typed
// options into CRIU's RPC options (exactly one place, Options.rpc), running
// `criu swrk` with the fds it must inherit, vetting a CRIU configuration
// file a user hands through (ConfigFile), and turning a failed CRIU log
// into an error a person can act on, classed as one that recurs
// (ErrRecurring) or may pass (ErrAddressInUse).
//
// It must not touch the store or know about offload contexts: callers hand
// it an images directory and get back CRIU's verdict.
package criu
