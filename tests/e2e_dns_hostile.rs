//! End-to-end: the builtin resolver under hostile input from inside the container.
//!
//! From the container's network namespace, thousands of malformed datagrams (random bytes,
//! valid headers with garbage after them, answers instead of questions, compression loops),
//! lying TCP length prefixes, half-sent TCP frames and idle TCP connections are thrown at
//! 127.0.0.1:53 and [::1]:53. Afterwards the resolver must still be the same process, still
//! answer allowlisted names over UDP and TCP, still refuse the rest, and no garbage may have
//! been forwarded upstream. Needs root and scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use e2e::dns_config;
use e2e::world::*;

/// Python (run in the container's netns): the hostile traffic. Bounded: fixed counts, short
/// timeouts. Prints one summary line.
const HOSTILE: &str = r#"
import os, random, socket, struct, time
random.seed(7)
def q(name, qtype=1, flags=0x0100, qd=1):
    h = struct.pack(">HHHHHH", random.randrange(65536), flags, qd, 0, 0, 0)
    b = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    return h + b + struct.pack(">HH", qtype, 1)
msgs = []
for i in range(1500):
    msgs.append(os.urandom(random.randrange(0, 600)))
for i in range(300):
    m = bytearray(q("svc.e2e.test"))
    for _ in range(random.randrange(1, 6)):
        m[random.randrange(len(m))] = random.randrange(256)
    msgs.append(bytes(m))
msgs.append(q("svc.e2e.test", flags=0x8180))                 # a response, not a question
msgs.append(q("svc.e2e.test", qd=0))                         # no question
msgs.append(q("svc.e2e.test", qd=40))                        # more questions than present
msgs.append(struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\0\1\0\1")  # pointer loop
msgs.append(q("a" * 63 + "." + "b" * 63 + ".e2e.test"))
msgs.append(q("svc.e2e.test", qtype=255))                   # ANY
msgs.append(q("svc.e2e.test", qtype=252))                   # AXFR over UDP
sent = 0
for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    for m in msgs:
        try:
            s.sendto(m, (addr, 53)); sent += 1
        except OSError:
            pass
    s.close()
tcp = 0
idle = []
for fam, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    for payload in (b"\xff\xff" + os.urandom(100), b"\x00\x20" + os.urandom(5), b"\x00", os.urandom(3000),
                    b"\x00\x00", struct.pack(">H", 70) + q("svc.e2e.test")[:40]):
        try:
            c = socket.create_connection((addr, 53), timeout=2)
            c.sendall(payload); tcp += 1
            c.close()
        except OSError:
            pass
    for _ in range(20):
        try:
            idle.append(socket.create_connection((addr, 53), timeout=2))
        except OSError:
            pass
time.sleep(0.5)
for c in idle:
    c.close()
print("HOSTILE sent=%d tcp=%d idle=%d" % (sent, tcp, len(idle)))
"#;

#[test]
fn the_resolver_survives_hostile_input_and_keeps_its_rules() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-hostile", "svc.e2e.test\n");
    let name = h.name("dns-hostile");
    h.run_detached(&name, "e2e-hostile").expect_ok();
    let runtime_before = h.read(&h.bundle_dir(&name).join("runtime.json"));
    let pid = h
        .podman(&["inspect", "-f", "{{.State.Pid}}", &name])
        .expect_ok()
        .stdout
        .trim()
        .to_string();
    let queries_before = h.world.dns_queries().len();
    let out = std::process::Command::new("timeout")
        .args(["120", "nsenter", "-t", &pid, "-n", "python3", "-c", HOSTILE])
        .output()
        .expect("nsenter runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("HOSTILE sent=3614 tcp=12 idle=40"),
        "the hostile client did not run as planned: {out:?}"
    );
    // Still the same resolver process, still answering by the rules, over UDP and TCP.
    assert_eq!(h.shield_state(&name), "up");
    assert_eq!(
        h.read(&h.bundle_dir(&name).join("runtime.json")),
        runtime_before
    );
    let check = h.exec(
        &name,
        &format!(
            "echo \"UDP: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
             echo \"REFUSED: $(timeout 5 nslookup pair.e2e.test 2>&1 | grep -c 198.51.100.7)\"\n\
             printf '\\000\\036\\022\\064\\001\\000\\000\\001\\000\\000\\000\\000\\000\\000\\003svc\\003e2e\\004test\\000\\000\\001\\000\\001' \
               | timeout 5 nc 127.0.0.1 53 | xxd -p | tr -d '\\n' > /tmp/tcp.hex; echo \"TCP: $(cat /tmp/tcp.hex)\"\n"
        ),
    );
    assert!(check.stdout.contains("UDP: 1"), "{check}");
    assert!(check.stdout.contains("REFUSED: 0"), "{check}");
    // NAMED4 (198.51.100.60) as the last four bytes of an A record: c6 33 64 3c.
    assert!(
        check.stdout.contains("c633643c"),
        "no TCP answer with the address: {check}"
    );
    // Nothing malformed went upstream: only names the allowlist covers were ever asked.
    let asked: Vec<String> = h.world.dns_queries()[queries_before..].to_vec();
    assert!(
        asked.iter().all(|q| q == "svc.e2e.test"),
        "garbage or unlisted names reached upstream: {asked:?}"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}
