// vcsim-hamal: a vSphere simulator for hamal's tests. It is govmomi's simulator (the VPX model:
// vCenter, datacenter, hosts, VMs) plus what hamal needs and the simulator lacks:
//
//   - VM disks as the test spec says (key, file, capacity, mode, uuid) and the VM's hardware
//     version, so a test chooses independent disks, small flag disks, old hardware;
//   - at each snapshot, a frozen copy of every disk file (the fake VixDiskLib reads it through the
//     snapshot's backing file name) and a per-disk changeId "<epoch>/<n>" when CBT is on;
//   - QueryChangedDiskAreas over a change log the tests append to (ROOT/changes.json:
//     {"<file>": {"epoch": "52 ...", "changes": [[offset, length], ...]}}): the areas of changes
//     n+1 .. the snapshot's, or the allocated areas for "*", PAGE areas per answer so a client
//     must loop; a changeId of another epoch is a FileFault ("cannot compute changes").
//
// Usage: vcsim-hamal -root DIR -spec FILE -user U -password P [-page N]
// Prints one JSON line {"url": ..., "vms": [{"name", "moref", "instance_uuid"}]}, then serves
// until killed. Disk files are ROOT/<file>; datastore paths are "[LocalDS_0] <file>".
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"html"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const datastore = "LocalDS_0"

type diskSpec struct {
	Key      int32  `json:"key"`
	File     string `json:"file"`
	Capacity int64  `json:"capacity"`
	Mode     string `json:"mode"`
	Uuid     string `json:"uuid"`
}

type vmSpec struct {
	Name    string     `json:"name"`
	Version string     `json:"version"`
	Disks   []diskSpec `json:"disks"`
	Ips     []string   `json:"ips"` // the guest's addresses, as VMware Tools reports them
}

type spec struct {
	Vms []vmSpec `json:"vms"`
}

type changeLog struct {
	Epoch   string     `json:"epoch"`
	Changes [][2]int64 `json:"changes"`
}

// snapDisk is what a snapshot froze of one disk.
type snapDisk struct {
	live, frozen string
	capacity     int64
	epoch        string
	upTo         int
}

var (
	root     string
	specPath string
	page     int
	mu       sync.Mutex
	snaps    = map[string]map[int32]snapDisk{} // snapshot moref -> device key -> disk
)

func readChanges() map[string]changeLog {
	out := map[string]changeLog{}
	data, err := os.ReadFile(filepath.Join(root, "changes.json"))
	if err == nil {
		_ = json.Unmarshal(data, &out)
	}
	return out
}

func readSpec() spec {
	var s spec
	data, err := os.ReadFile(specPath)
	if err != nil {
		log.Fatalf("spec %s: %v", specPath, err)
	}
	if err := json.Unmarshal(data, &s); err != nil {
		log.Fatalf("spec %s: %v", specPath, err)
	}
	return s
}

func rel(fileName string) string {
	if i := strings.Index(fileName, "] "); i >= 0 {
		return fileName[i+2:]
	}
	return fileName
}

// setDisks replaces the VM's disks with the spec's (keeping their controller).
func setDisks(vm *simulator.VirtualMachine, s vmSpec) {
	if s.Version != "" {
		vm.Config.Version = s.Version
	}
	var ctrl int32 = 1000
	var devs []types.BaseVirtualDevice
	for _, d := range vm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok {
			ctrl = disk.ControllerKey
			continue
		}
		devs = append(devs, d)
	}
	for i, d := range s.Disks {
		mode := d.Mode
		if mode == "" {
			mode = "persistent"
		}
		unit := int32(i)
		devs = append(devs, &types.VirtualDisk{
			VirtualDevice: types.VirtualDevice{
				Key:           d.Key,
				ControllerKey: ctrl,
				UnitNumber:    &unit,
				DeviceInfo:    &types.Description{Label: fmt.Sprintf("Hard disk %d", i+1), Summary: d.File},
				Backing: &types.VirtualDiskFlatVer2BackingInfo{
					VirtualDeviceFileBackingInfo: types.VirtualDeviceFileBackingInfo{
						FileName: fmt.Sprintf("[%s] %s", datastore, d.File),
					},
					DiskMode:        mode,
					ThinProvisioned: types.NewBool(true),
					Uuid:            d.Uuid,
				},
			},
			CapacityInKB:    d.Capacity / 1024,
			CapacityInBytes: d.Capacity,
		})
	}
	vm.Config.Hardware.Device = devs
	if len(s.Ips) > 0 {
		vm.Guest.Net = []types.GuestNicInfo{{MacAddress: "00:50:56:aa:bb:01", Connected: true, IpAddress: s.Ips}}
	}
}

// growDisks applies the spec's capacities (the tests grow a disk there) before a snapshot.
func growDisks(vm *simulator.VirtualMachine) {
	for _, s := range readSpec().Vms {
		if s.Name == vm.Name {
			for _, d := range s.Disks {
				for _, dev := range vm.Config.Hardware.Device {
					if disk, ok := dev.(*types.VirtualDisk); ok && disk.Key == d.Key {
						disk.CapacityInBytes, disk.CapacityInKB = d.Capacity, d.Capacity/1024
					}
				}
			}
		}
	}
}

// freeze gives a new snapshot frozen copies of the disks and, with CBT on, their changeIds.
func freeze(vm *simulator.VirtualMachine, ref types.ManagedObjectReference) {
	snap := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	changes := readChanges()
	cbt := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	frozen := map[int32]snapDisk{}
	var devs []types.BaseVirtualDevice
	for _, dev := range snap.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			devs = append(devs, dev)
			continue
		}
		copyDisk := *disk
		backing := *disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		live := rel(backing.FileName)
		frozenFile := fmt.Sprintf("%s-%s.vmdk", strings.TrimSuffix(live, ".vmdk"), ref.Value)
		cp := exec.Command("cp", "--sparse=always", filepath.Join(root, live), filepath.Join(root, frozenFile))
		if out, err := cp.CombinedOutput(); err != nil {
			log.Printf("freezing %s: %v %s", live, err, out)
		}
		backing.FileName = fmt.Sprintf("[%s] %s", datastore, frozenFile)
		c := changes[live]
		if cbt {
			backing.ChangeId = fmt.Sprintf("%s/%d", c.Epoch, len(c.Changes))
		}
		copyDisk.Backing = &backing
		devs = append(devs, &copyDisk)
		frozen[disk.Key] = snapDisk{live, frozenFile, disk.CapacityInBytes, c.Epoch, len(c.Changes)}
	}
	snap.Config.Hardware.Device = devs
	snaps[ref.Value] = frozen
}

// allocated lists the data extents of a file (SEEK_DATA / SEEK_HOLE).
func allocated(path string, size int64) [][2]int64 {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	fd := int(f.Fd())
	var out [][2]int64
	for off := int64(0); off < size; {
		data, err := syscall.Seek(fd, off, 3) // SEEK_DATA
		if err != nil || data >= size {
			break
		}
		hole, err := syscall.Seek(fd, data, 4) // SEEK_HOLE
		if err != nil || hole > size {
			hole = size
		}
		out = append(out, [2]int64{data, hole - data})
		off = hole
	}
	return out
}

// merge sorts and joins overlapping or touching extents.
func merge(in [][2]int64) [][2]int64 {
	sort.Slice(in, func(i, j int) bool { return in[i][0] < in[j][0] })
	var out [][2]int64
	for _, e := range in {
		if n := len(out); n > 0 && e[0] <= out[n-1][0]+out[n-1][1] {
			if end := e[0] + e[1]; end > out[n-1][0]+out[n-1][1] {
				out[n-1][1] = end - out[n-1][0]
			}
			continue
		}
		out = append(out, e)
	}
	return out
}

const envelopeHead = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`
const envelopeTail = `</soapenv:Body></soapenv:Envelope>`

func fault(kind, field, msg string) (int, string) {
	return 500, fmt.Sprintf(`%s<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
		`<detail><%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault></detail></soapenv:Fault>%s`,
		envelopeHead, html.EscapeString(msg), kind, kind, field, kind, envelopeTail)
}

var field = regexp.MustCompile(`<(snapshot|deviceKey|startOffset|changeId)[^>]*>([^<]*)</`)

// queryChangedDiskAreas answers from the change log, PAGE areas at a time.
func queryChangedDiskAreas(vm *simulator.VirtualMachine, body []byte) (int, string) {
	args := map[string]string{}
	for _, m := range field.FindAllSubmatch(body, -1) {
		args[string(m[1])] = html.UnescapeString(string(m[2]))
	}
	if vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled {
		return fault("FileFault", "<file>cbt</file>", "change tracking is not enabled on this VM")
	}
	key, _ := strconv.Atoi(args["deviceKey"])
	start, _ := strconv.ParseInt(args["startOffset"], 10, 64)
	d, ok := snaps[args["snapshot"]][int32(key)]
	if !ok {
		return fault("InvalidArgument", "<invalidProperty>deviceKey</invalidProperty>", "no such disk in the snapshot")
	}
	if start < 0 || start >= d.capacity {
		return fault("InvalidArgument", "<invalidProperty>startOffset</invalidProperty>", "startOffset out of range")
	}
	var areas [][2]int64
	changeId := args["changeId"]
	if changeId == "*" {
		areas = allocated(filepath.Join(root, d.frozen), d.capacity)
	} else {
		i := strings.LastIndex(changeId, "/")
		n, err := strconv.Atoi(changeId[i+1:])
		if i < 0 || err != nil || changeId[:i] != d.epoch || n > d.upTo {
			msg := "cannot compute changes for " + d.live + " since changeId " + changeId
			return fault("FileFault", "<file>"+html.EscapeString(d.live)+"</file>", msg)
		}
		areas = merge(append([][2]int64(nil), readChanges()[d.live].Changes[n:d.upTo]...))
	}
	length := d.capacity - start
	var out strings.Builder
	taken := 0
	for _, a := range areas {
		s, e := a[0], a[0]+a[1]
		if e > d.capacity {
			e = d.capacity
		}
		if e <= start {
			continue
		}
		if s < start {
			s = start
		}
		if taken == page {
			length = s - start // the next call starts at this area
			break
		}
		fmt.Fprintf(&out, "<changedArea><start>%d</start><length>%d</length></changedArea>", s, e-s)
		taken++
	}
	return 200, fmt.Sprintf(`%s<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>%d</startOffset>`+
		`<length>%d</length>%s</returnval></QueryChangedDiskAreasResponse>%s`, envelopeHead, start, length, out.String(), envelopeTail)
}

var this = regexp.MustCompile(`<_this[^>]*type="VirtualMachine"[^>]*>([^<]*)</_this>`)

// intercept answers QueryChangedDiskAreas itself and completes each new snapshot before its
// answer leaves (the simulator runs the snapshot task within the request).
func intercept(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		var vm *simulator.VirtualMachine
		if m := this.FindSubmatch(body); m != nil {
			ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: string(m[1])}
			vm, _ = simulator.Map.Get(ref).(*simulator.VirtualMachine)
		}
		query := vm != nil && bytes.Contains(body, []byte("<QueryChangedDiskAreas"))
		snapshot := vm != nil && bytes.Contains(body, []byte("<CreateSnapshot_Task"))
		if !query && !snapshot {
			next.ServeHTTP(w, r) // long polls (WaitForUpdatesEx) must not hold the lock
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if query {
			status, text := queryChangedDiskAreas(vm, body)
			w.Header().Set("Content-Type", "text/xml; charset=utf-8")
			w.WriteHeader(status)
			_, _ = io.WriteString(w, text)
			return
		}
		growDisks(vm)
		rec := httptest.NewRecorder()
		next.ServeHTTP(rec, r)
		if vm.Snapshot != nil && vm.Snapshot.CurrentSnapshot != nil {
			if _, done := snaps[vm.Snapshot.CurrentSnapshot.Value]; !done {
				freeze(vm, *vm.Snapshot.CurrentSnapshot)
			}
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	})
}

func main() {
	user := flag.String("user", "administrator@vsphere.local", "login user")
	certFile := flag.String("cert", "", "TLS certificate (PEM); default: the test library's own")
	keyFile := flag.String("key", "", "its key (PEM)")
	password := flag.String("password", "", "login password")
	flag.StringVar(&root, "root", "", "folder of the disk files and changes.json")
	flag.StringVar(&specPath, "spec", "", "VM and disk spec (JSON)")
	flag.IntVar(&page, "page", 4, "changed areas per QueryChangedDiskAreas answer")
	flag.Parse()
	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*user, *password)}
	model.Service.TLS = new(tls.Config)
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatal(err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}
	vms := []map[string]string{}
	for _, s := range readSpec().Vms {
		var vm *simulator.VirtualMachine
		for _, e := range simulator.Map.All("VirtualMachine") {
			if v := e.(*simulator.VirtualMachine); v.Name == s.Name {
				vm = v
			}
		}
		if vm == nil {
			log.Fatalf("no VM %s in the model", s.Name)
		}
		setDisks(vm, s)
		vms = append(vms, map[string]string{"name": vm.Name, "moref": vm.Self.Value, "instance_uuid": vm.Config.InstanceUuid})
	}
	server := model.Service.NewServer()
	server.Config.Handler = intercept(server.Config.Handler)
	public := *server.URL
	public.User = nil
	out, _ := json.Marshal(map[string]interface{}{"url": public.String(), "vms": vms})
	fmt.Println(string(out))
	_, _ = io.Copy(io.Discard, os.Stdin) // serves until stdin closes
	server.Close()
}
