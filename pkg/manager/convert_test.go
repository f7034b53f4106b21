package manager

import (
	"encoding/json"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/boxlite/boxlite/pkg/api"
)

// fillNonZero sets every field reachable from v to a non-zero value distinct
// from every other one (n counts them), so that a field dropped or swapped
// by a conversion shows.
func fillNonZero(t *testing.T, v reflect.Value, path string, n *int) {
	t.Helper()
	*n++
	switch v.Kind() {
	case reflect.String:
		v.SetString(fmt.Sprintf("%s-%d", path, *n))
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(*n))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(*n))
	case reflect.Float32, reflect.Float64:
		v.SetFloat(float64(*n) + 0.5)
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 1, 1)
		fillNonZero(t, s.Index(0), path+"[0]", n)
		v.Set(s)
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fillNonZero(t, k, path+".key", n)
		fillNonZero(t, e, path+".value", n)
		m.SetMapIndex(k, e)
		v.Set(m)
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			v.Set(reflect.ValueOf(time.Date(2025, 1, 2, 3, 4, 5, *n, time.UTC)))
			return
		}
		for i := range v.NumField() {
			f := v.Type().Field(i)
			if !f.IsExported() {
				t.Fatalf("%s.%s is unexported: cannot fill it", path, f.Name)
			}
			fillNonZero(t, v.Field(i), path+"."+f.Name, n)
		}
	default:
		t.Fatalf("%s: cannot fill a %s", path, v.Kind())
	}
}

// jsonObject is v's JSON, key by key.
func jsonObject(t *testing.T, v any) map[string]json.RawMessage {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// jsonKeys are the JSON names of a struct type's fields.
func jsonKeys(typ reflect.Type) []string {
	var keys []string
	for f := range typ.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "" {
			name = f.Name
		}
		if name != "-" {
			keys = append(keys, name)
		}
	}
	slices.Sort(keys)
	return keys
}

// The API's box is the record, field for field: inspect shows the same
// thing in both modes, and a field added to one but not the other fails.
func TestRecordAPIIsTheRecordKeyForKey(t *testing.T) {
	if r, b := jsonKeys(reflect.TypeFor[Record]()), jsonKeys(reflect.TypeFor[api.Box]()); !slices.Equal(r, b) {
		t.Errorf("JSON keys differ:\nRecord  %v\napi.Box %v", r, b)
	}
	var rec Record
	n := 0
	fillNonZero(t, reflect.ValueOf(&rec).Elem(), "Record", &n)
	want, got := jsonObject(t, rec), jsonObject(t, rec.API())
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if string(got[k]) != string(want[k]) {
			t.Errorf("%s: API %s, record %s", k, got[k], want[k])
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: in the API (%s), not in the record", k, got[k])
		}
	}
}

// The API's event carries every field of the event it shares.
func TestEventAPICarriesEveryField(t *testing.T) {
	var ev Event
	n := 0
	v := reflect.ValueOf(&ev).Elem()
	for i := range v.NumField() {
		if f := v.Type().Field(i); f.Name != "Payload" {
			fillNonZero(t, v.Field(i), "Event."+f.Name, &n)
		}
	}
	got := reflect.ValueOf(ev.API())
	for i := range got.NumField() {
		name := got.Type().Field(i).Name
		src := v.FieldByName(name)
		if !src.IsValid() {
			t.Errorf("api.Event.%s has no Event field to come from", name)
			continue
		}
		if !reflect.DeepEqual(got.Field(i).Interface(), src.Interface()) {
			t.Errorf("%s: API %v, event %v", name, got.Field(i), src)
		}
	}
}
