#!/usr/bin/env python3
"""Regenerate the hand-made seed corpora under fuzz/corpus/<target>/.

Each seed starts with the harness's setup byte (see fuzz/src/harness_*.rs).
Seed files are named seed-<what>; libFuzzer adds its own (hash-named)
files next to them when fuzz/run is used, which are meant to be checked in
only if small.
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------- NBD options
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7, STRUCTURED_REPLY=8,
           LIST_META_CONTEXT=9, SET_META_CONTEXT=10, EXTENDED_HEADERS=11)


def opt(o, data=b""):
    return struct.pack(">II", OPT[o], len(data)) + data


def go(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta(name, queries):
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


T = "nbd_handshake"
put(T, "go", b"\x01" + opt("GO", go("disk")))
put(T, "go-default-export", b"\x01" + opt("GO", go("", [0, 1, 2, 3])))
put(T, "structured-info-go", b"\x01" + opt("STRUCTURED_REPLY") + opt("INFO", go("disk", [3, 2, 1])) + opt("GO", go("disk", [3])))
put(T, "extended-meta-go", b"\x01" + opt("EXTENDED_HEADERS") + opt("LIST_META_CONTEXT", meta("disk", ["base:"]))
    + opt("SET_META_CONTEXT", meta("disk", ["base:allocation"])) + opt("GO", go("disk")))
put(T, "structured-meta-go", b"\x00" + opt("STRUCTURED_REPLY") + opt("SET_META_CONTEXT", meta("disk", ["base:allocation", "qemu:dirty-bitmap:x"]))
    + opt("GO", go("disk")))
put(T, "list-abort", b"\x01" + opt("LIST") + opt("LIST", b"junk") + opt("ABORT"))
put(T, "export-name", b"\x01" + opt("EXPORT_NAME", b"disk"))
put(T, "export-name-unknown", b"\x00" + opt("EXPORT_NAME", b"nope"))
put(T, "starttls-unknown-opt", b"\x01" + opt("STARTTLS") + struct.pack(">II", 99, 3) + b"abc" + opt("GO", go("missing")))
put(T, "shutting-down-go", b"\x03" + opt("GO", go("disk")))
put(T, "duplicate-options", b"\x01" + opt("STRUCTURED_REPLY") + opt("STRUCTURED_REPLY") + opt("EXTENDED_HEADERS")
    + opt("EXTENDED_HEADERS") + opt("SET_META_CONTEXT", meta("other", ["base:allocation"])) + opt("GO", go("disk")))

# --------------------------------------------------------------- NBD requests
REQ, EREQ = 0x25609513, 0x21E41C71
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5, WRITE_ZEROES=6, BLOCK_STATUS=7)


def req(cmd, off, ln, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ, flags, CMD[cmd], cookie, off, ln) + payload


def ereq(cmd, off, ln, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQQ", EREQ, flags, CMD[cmd], cookie, off, ln) + payload


T = "nbd_requests"
for name, f in (("compact", req), ("extended", ereq)):
    put(T, name + "-read", b"\x00" + f("READ", 0, 4096) + f("READ", 512, 512, flags=4, cookie=2))
    put(T, name + "-write", b"\x00" + f("WRITE", 4096, 16, flags=1, payload=bytes(range(16))) + f("FLUSH", 0, 0, cookie=2))
    put(T, name + "-trim-zeroes", b"\x08" + f("TRIM", 0, 8192) + f("WRITE_ZEROES", 8192, 4096, flags=0x12, cookie=3))
    put(T, name + "-cache-status", b"\x04" + f("CACHE", 0, 65536) + f("BLOCK_STATUS", 0, 1 << 20, flags=8, cookie=4))
    put(T, name + "-out-of-range", b"\x00" + f("READ", (1 << 20) - 1, 2) + f("WRITE", 1 << 40, 4, payload=b"abcd", cookie=2))
    put(T, name + "-read-only-write", b"\x01" + f("WRITE", 0, 8, payload=b"12345678") + f("DISC", 0, 0, cookie=9))
    put(T, name + "-refused-at-shutdown", b"\x20" + f("WRITE", 0, 32, payload=b"x" * 32) * 8)
put(T, "extended-write-payload-flag", b"\x00" + ereq("WRITE", 0, 8, flags=0x20, payload=b"ABCDEFGH"))
put(T, "extended-read-with-payload", b"\x00" + ereq("READ", 0, 8, flags=0x20, payload=b"ABCDEFGH"))
put(T, "compact-oversized-write", b"\x00" + req("WRITE", 0, 1 << 21, payload=b"\0" * 64))
put(T, "compact-unknown-command", b"\x02" + struct.pack(">IHHQQI", REQ, 0xffff, 42, 7, 0, 0))

# ---------------------------------------------------------- NBD client replies
SMAG, STMAG, EXMAG = 0x67446698, 0x668E33EF, 0x6E8A278C


def simple(errno, cookie, data=b""):
    return struct.pack(">IIQ", SMAG, errno, cookie) + data


def chunk(flags, typ, cookie, payload):
    return struct.pack(">IHHQI", STMAG, flags, typ, cookie, len(payload)) + payload


def echunk(flags, typ, cookie, off, payload):
    return struct.pack(">IHHQQQ", EXMAG, flags, typ, cookie, off, len(payload)) + payload


T = "nbd_client_replies"
READ16 = 0x1000          # cookie & 3 == 0: Read{offset 0, len 16}
STATUS = 0x10001         # cookie & 3 == 1: BlockStatus{offset 0, len 256, context 1}
PLAIN = 0x2              # cookie & 3 == 2: Plain
put(T, "simple-read-and-error", b"\x00" + simple(0, READ16, bytes(16)) + simple(5, READ16) + simple(0, PLAIN))
put(T, "simple-unknown-cookie", b"\x04" + simple(0, 1 << 63))
put(T, "structured-read-data-hole", b"\x01" + chunk(0, 1, READ16, struct.pack(">Q", 0) + bytes(8))
    + chunk(0, 2, READ16, struct.pack(">QI", 8, 8)) + chunk(1, 0, READ16, b""))
put(T, "structured-block-status", b"\x05" + chunk(0, 5, STATUS, struct.pack(">III", 1, 128, 0) + struct.pack(">II", 128, 3))
    + chunk(1, 0, STATUS, b""))
put(T, "structured-error", b"\x01" + chunk(1, 0x8001, PLAIN, struct.pack(">IH", 5, 4) + b"oops")
    + chunk(1, 0x8002, READ16, struct.pack(">IH", 5, 0) + struct.pack(">Q", 4)))
put(T, "structured-simple-error", b"\x01" + simple(28, PLAIN))
put(T, "extended-read", b"\x02" + echunk(1, 1, READ16, 0, struct.pack(">Q", 0) + bytes(16)))
put(T, "extended-block-status-ext", b"\x06" + echunk(0, 6, STATUS, 0, struct.pack(">II", 1, 1) + struct.pack(">QQ", 256, 0))
    + echunk(1, 0, STATUS, 0, b""))
put(T, "extended-wrong-offset", b"\x02" + echunk(1, 0, PLAIN, 512, b""))

# ---------------------------------------------------------------- iSCSI PDUs


def pad(b):
    return b + b"\0" * (-len(b) % 4)


def bhs(opcode, flags, data_len=0, lun=0, itt=1, rest=b"", ahs_len=0):
    b = bytearray(48)
    b[0] = opcode
    b[1] = flags
    b[4] = ahs_len
    b[5:8] = data_len.to_bytes(3, "big")
    b[8:16] = lun.to_bytes(8, "big")
    b[16:20] = itt.to_bytes(4, "big")
    b[20:20 + len(rest)] = rest
    return bytes(b)


def pdu(opcode, flags, data=b"", **kw):
    return bhs(opcode, flags, len(data), **kw) + pad(data)


def text(pairs):
    return b"".join(k.encode() + b"=" + v.encode() + b"\0" for k, v in pairs)


login_keys = text([("InitiatorName", "iqn.2026-01.org.example:init"), ("TargetName", "iqn.2026-01.org.longwire:disk"),
                   ("SessionType", "Normal"), ("AuthMethod", "None")])
# Login: I bit + opcode 3; T=1, CSG=0 (security), NSG=1; ISID, TSIH 0, CID 0, CmdSN 1, ExpStatSN 0.
login_bhs = bytearray(bhs(0x43, 0x81, len(login_keys)))
login_bhs[8:14] = b"\x80\x00\x00\x01\x00\x00"
login_bhs[24:28] = (1).to_bytes(4, "big")
login = bytes(login_bhs) + pad(login_keys)
T = "iscsi_pdu"
put(T, "login", b"\x00" + login)
op_keys = text([("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "262144")])
put(T, "login-operational", b"\x00" + pdu(0x43, 0x87, op_keys))
cdb_read10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]) + bytes(6)
put(T, "scsi-read10", b"\x00" + pdu(0x01, 0xC1, lun=0, itt=2, rest=(4096).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes(4) + cdb_read10))
cdb_write10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]) + bytes(6)
put(T, "scsi-write10-immediate", b"\x00" + pdu(0x01, 0xA1, bytes(512), itt=3, rest=(512).to_bytes(4, "big") + bytes(8) + cdb_write10))
put(T, "data-out", b"\x00" + pdu(0x05, 0x80, bytes(64), itt=3, rest=b"\xff\xff\xff\xff" + bytes(8) + (0).to_bytes(4, "big") + (512).to_bytes(4, "big")))
put(T, "nop-out", b"\x00" + pdu(0x40, 0x80, b"ping", itt=4, rest=b"\xff\xff\xff\xff"))
put(T, "text-sendtargets", b"\x00" + pdu(0x04, 0x80, text([("SendTargets", "All")]), itt=5, rest=b"\xff\xff\xff\xff"))
put(T, "task-mgmt-abort", b"\x00" + pdu(0x02, 0x81, itt=6, rest=(3).to_bytes(4, "big")))
put(T, "logout", b"\x00" + pdu(0x46, 0x80, itt=7))
put(T, "snack", b"\x00" + pdu(0x10, 0x80, itt=8))
put(T, "ahs-extended-cdb", b"\x00" + bhs(0x01, 0x81, 0, itt=9, ahs_len=2) + struct.pack(">HB", 5, 1) + bytes(5))
# With header and data digests (setup byte 3).
h = bhs(0x40, 0x80, 4, itt=10, rest=b"\xff\xff\xff\xff")
d = b"ping"
put(T, "nop-out-digests", b"\x03" + h + struct.pack("<I", crc32c(h)) + d + struct.pack("<I", crc32c(d)))
put(T, "two-pdus", b"\x00" + login + pdu(0x40, 0x80, itt=11, rest=b"\xff\xff\xff\xff"))

# ---------------------------------------------------------------- iSCSI keys
T = "iscsi_keys"
put(T, "login-security", b"\x00" + login_keys)
put(T, "operational", b"\x04" + text([("HeaderDigest", "CRC32C,None"), ("DataDigest", "None"),
                                      ("MaxRecvDataSegmentLength", "65536"), ("MaxBurstLength", "262144"),
                                      ("FirstBurstLength", "65536"), ("InitialR2T", "No"), ("ImmediateData", "Yes"),
                                      ("MaxOutstandingR2T", "1"), ("DataPDUInOrder", "Yes"),
                                      ("DataSequenceInOrder", "Yes"), ("DefaultTime2Wait", "2"),
                                      ("DefaultTime2Retain", "20"), ("ErrorRecoveryLevel", "0"),
                                      ("MaxConnections", "1")]))
put(T, "discovery", b"\x01" + text([("SessionType", "Discovery"), ("MaxRecvDataSegmentLength", "8192"),
                                    ("InitialR2T", "Yes")]))
put(T, "hex-and-bad-values", b"\x02" + text([("MaxBurstLength", "0x100000"), ("FirstBurstLength", "999999999999"),
                                             ("MaxOutstandingR2T", "0"), ("HeaderDigest", "MD5"), ("X-com.example.Foo", "bar")]))
put(T, "renegotiate", b"\x06" + text([("MaxConnections", "1"), ("MaxConnections", "2")]))
put(T, "chap", b"\x00" + text([("AuthMethod", "CHAP,None"), ("CHAP_A", "5"), ("CHAP_N", "user"), ("CHAP_R", "0x" + "ab" * 16)]))
put(T, "malformed", b"\x00" + b"NoEquals\0=novalue\0Key=\xff\xfe\0")
put(T, "continued", b"\x3e" + text([("TargetAlias", "x" * 200), ("ImmediateData", "No")]))

# ---------------------------------------------------------------- SCSI CDBs
T = "scsi_cdb"
cdbs = {
    "test-unit-ready": [0x00, 0, 0, 0, 0, 0],
    "request-sense": [0x03, 0, 0, 0, 252, 0],
    "inquiry": [0x12, 0, 0, 0, 96, 0],
    "inquiry-vpd-83": [0x12, 1, 0x83, 0, 255, 0],
    "mode-sense6": [0x1A, 0x08, 0x3F, 0, 192, 0],
    "mode-sense10": [0x5A, 0x10, 0x08, 0, 0, 0, 0, 0x10, 0, 0],
    "mode-select6": [0x15, 0x10, 0, 0, 24, 0],
    "mode-select10": [0x55, 0x10, 0, 0, 0, 0, 0, 0, 24, 0],
    "reserve6": [0x16, 0, 0, 0, 0, 0],
    "release6": [0x17, 0, 0, 0, 0, 0],
    "prevent-allow": [0x1E, 0, 0, 0, 1, 0],
    "start-stop": [0x1B, 0, 0, 0, 1, 0],
    "read-capacity10": [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "read-capacity16": [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0],
    "get-lba-status": [0x9E, 0x12] + [0] * 8 + [0, 0, 0x10, 0, 0, 0],
    "read6": [0x08, 0, 0, 0, 0, 0],
    "read10": [0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0],
    "read12": [0xA8, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
    "read16": [0x88, 0] + [0] * 7 + [8] + [0, 0, 0, 8, 0, 0],
    "write6": [0x0A, 0, 0, 1, 1, 0],
    "write10-fua": [0x2A, 0x08, 0, 0, 0, 0, 0, 0, 1, 0],
    "write12": [0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
    "write16": [0x8A, 0] + [0] * 8 + [0, 0, 0, 1, 0, 0],
    "write-protect-bits": [0x2A, 0x20, 0, 0, 0, 0, 0, 0, 1, 0],
    "verify10-bytchk": [0x2F, 0x02, 0, 0, 0, 0, 0, 0, 1, 0],
    "verify16": [0x8F, 0x06] + [0] * 8 + [0, 0, 0, 1, 0, 0],
    "write-and-verify10": [0x2E, 0, 0, 0, 0, 0, 0, 0, 1, 0],
    "write-same10-unmap": [0x41, 0x08, 0, 0, 0, 0, 0, 0, 16, 0],
    "write-same16-ndob": [0x93, 0x09] + [0] * 8 + [0, 0, 0, 16, 0, 0],
    "sync-cache10": [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "sync-cache16": [0x91, 0] + [0] * 14,
    "unmap": [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
    "compare-and-write": [0x89, 0] + [0] * 8 + [0, 0, 0, 1, 0, 0],
    "pre-fetch10": [0x34, 0, 0, 0, 0, 0, 0, 0, 8, 0],
    "pre-fetch16": [0x90, 0] + [0] * 14,
    "report-luns": [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    "report-supported-opcodes": [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0],
    "report-supported-one": [0xA3, 0x0C, 1, 0x28, 0, 0, 0, 0, 0, 64, 0, 0],
    "persistent-reserve-in": [0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0],
    "persistent-reserve-out": [0x5F, 0x01, 0, 0, 0, 0, 0, 0, 24, 0],
    "unknown-opcode": [0xC0, 0, 0, 0, 0, 0],
    "short-read16": [0x88, 0, 0],
    "control-byte-naca": [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04],
}
for k, v in cdbs.items():
    put(T, k, v)
