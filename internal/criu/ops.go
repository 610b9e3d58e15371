package criu

import (
	"context"
	"errors"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
)

// Dump checkpoints the tree rooted at o.Pid into o.ImagesDir. On failure the
// error carries the Error lines of CRIU's log and the log's path; CRIU
// resumes the tree itself when a dump fails. A non-nil nfy is told CRIU's
// notifications (its action-script points): "post-dump" comes once the
// dump is written, the tree still frozen; an error there fails the dump
// and CRIU lets the tree run on.
func Dump(ctx context.Context, b Binary, o Options, nfy Notify) error {
	if o.Pid <= 0 {
		return errors.New("criu dump: no pid")
	}
	if o.LogFile == "" {
		o.LogFile = "dump.log"
	}
	b.fit(&o)
	ro, files, extra, err := o.request()
	if err != nil {
		return err
	}
	defer closeAll(files)
	if nfy != nil {
		ro.NotifyScripts = ptr(true)
	}
	t := rpc.CriuReqType_DUMP
	_, err = swrk(ctx, b.Path, &rpc.CriuReq{Type: &t, Opts: ro}, extra, false, nfy)
	if err != nil {
		return o.explain(err)
	}
	return nil
}

// Restore brings back the tree imaged in o.ImagesDir and returns the PID of
// its root. With RestoreSibling the root is a child of the calling process.
func Restore(ctx context.Context, b Binary, o Options, nfy Notify) (int, error) {
	if o.LogFile == "" {
		o.LogFile = "restore.log"
	}
	b.fit(&o)
	ro, files, extra, err := o.request()
	if err != nil {
		return 0, err
	}
	defer closeAll(files)
	var pid int32
	wrapped := func(script string, p int32) error {
		if script == "post-restore" {
			pid = p
		}
		if nfy != nil {
			return nfy(script, p)
		}
		return nil
	}
	ro.NotifyScripts = ptr(true)
	t := rpc.CriuReqType_RESTORE
	resp, err := swrk(ctx, b.Path, &rpc.CriuReq{Type: &t, Opts: ro}, extra, o.RestoreDetached, wrapped)
	if err != nil {
		return 0, o.explain(err)
	}
	if pid == 0 {
		pid = resp.GetRestore().GetPid()
	}
	return int(pid), nil
}

func (o Options) explain(err error) error {
	dir := o.WorkDir
	if dir == "" {
		dir = o.ImagesDir
	}
	return &Error{Err: err, Log: filepath.Join(dir, o.LogFile)}
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// fit makes o what b can do: a binary vetted for a user who is not root
// runs unprivileged, whatever the caller asked.
func (b Binary) fit(o *Options) {
	o.Unprivileged = b.Unprivileged
}
