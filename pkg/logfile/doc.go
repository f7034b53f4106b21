// Package logfile reads and writes a box's log: one file that holds both
// of its output streams, each chunk with its stream and the time it was
// written, so that readers (boxlite logs, attach) can demultiplex and
// filter it by time. The shim writes it, so it outlives the manager.
//
// A log is a sequence of frames, each
//
//	[1 byte stream][8 bytes big-endian unix nanoseconds][4 bytes big-endian length][data]
//
// with stream 1 for stdout and 2 for stderr. Writers put at most MaxFrame
// bytes of data in a frame; readers reject a frame longer than 1 MiB or of
// an unknown stream as corrupt (ErrCorrupt). A log may end in a partial
// frame while its writer is mid-write: a reader ignores it, or waits for
// the rest when following the log.
package logfile
