package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/boxlite/boxlite/pkg/api"
)

// events streams every event as server-sent events: one "data: {json}"
// record per event, the records boxlite events prints. A client that stops
// reading is dropped after writeTimeout (or when it falls behind the
// manager's event buffer); it never slows the daemon.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()
	// The first write tells the client the stream is open.
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, ": boxlite events\n\n")
	if rc.Flush() != nil {
		return
	}
	err := s.boxes.Events(ctx, func(ev api.Event) {
		data, err := json.Marshal(ev)
		if err != nil {
			return
		}
		out := deadlineWriter{w: w, rc: rc}
		if _, err := fmt.Fprintf(out, "event: box\ndata: %s\n\n", data); err != nil {
			cancel()
		}
	})
	if err != nil && ctx.Err() == nil {
		data, _ := json.Marshal(api.ErrorOf(err))
		fmt.Fprintf(deadlineWriter{w: w, rc: rc}, "event: error\ndata: %s\n\n", data)
	}
}
