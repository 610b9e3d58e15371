package criu

// CheckCache is the directory, node-local and root's, where every cryo
// process (a command, `cryo run`, the node daemon) has Vet remember a
// passing `criu check`. It is defined here once.
const CheckCache = "/run/cryo"
