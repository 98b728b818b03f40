"""Every name hamal assumes in FusionCompute's VRM API that public documentation does not
confirm, in one place: a correction from a real VRM is a one-line change here. Sources and
what is unverified: README, "FusionCompute: what is unverified". The CNA data channel's
framing is the Rust side's (``rust/hamal-core/src/fc/wire.rs``), the bitmap's bit order too
(``fc/bitmap.rs``).
"""

from __future__ import annotations

# Login (POST LOGIN_PATH): headers; the token comes back in TOKEN_HEADER.
LOGIN_PATH = "/service/session"
USER_HEADER = "X-Auth-User"
KEY_HEADER = "X-Auth-Key"
USER_TYPE_HEADER = "X-Auth-UserType"
#: Some clients spell it ``X-ENCRIPT-ALGORITHM``; hamal sends both.
ENCRYPT_HEADERS = ("X-ENCRYPT-ALGORITHM", "X-ENCRIPT-ALGORITHM")
#: "1": the key is the plain password; "0": its SHA-256 in hex (``connection.password_encoding``).
ENCRYPT_PLAIN, ENCRYPT_SHA256 = "1", "0"
TOKEN_HEADER = "X-Auth-Token"
ACCEPT = "application/json;version={version};charset=UTF-8"
#: The VRM's error code for an expired or unknown token (re-login once, then fail).
TOKEN_EXPIRED_CODES = ("10000040", "10000007")

# Inventory
SITES_PATH = "/service/sites"
SITES_LIST, VMS_LIST = "sites", "vms"
VM_UUID, VM_NAME, VM_URI, VM_URN = "uuid", "name", "uri", "urn"
VM_DISKS = ("vmConfig", "disks")  # path to the VM's disk list
DISK_VOLUME_URN, DISK_SIZE_GB, DISK_SEQ, DISK_INDEPENDENT = (
    "volumeUrn",
    "quantityGB",
    "sequenceNum",
    "isIndependent",
)
VM_NICS = ("vmConfig", "nics")
NIC_MAC, NIC_IP, NIC_IP6 = "mac", "ip", "ips6"

# Tasks: a call that starts one answers {taskUrn, taskUri}; GET taskUri has status and reason.
TASK_URI = "taskUri"
TASK_STATUS, TASK_REASON, TASK_PROGRESS = "status", "reasonDes", "progress"
TASK_RUNNING, TASK_SUCCESS, TASK_FAILED = ("waiting", "running"), "success", ("failed", "cancelled")

# Snapshots
SNAPSHOTS = "/snapshots"  # appended to the VM's URI
SNAPSHOT_TYPE_CBT = "CBTbackup"
SNAPSHOT_TREE = ("rootSnapshots", "childSnapshots")
SNAPSHOT_NAME, SNAPSHOT_URI, SNAPSHOT_URN, SNAPSHOT_TYPE = "name", "uri", "urn", "type"
VOLSNAPSHOTS = "volsnapshots"
VS_VOLUME_URN, VS_SNAP_UUID, VS_CBT_TIME, VS_CHG_ID = "volumeUrn", "snapUuid", "volCBTCreateTime", "chgID"
#: Backup snapshots a VM may hold.
MAX_BACKUP_SNAPSHOTS = 32

# Changed blocks: POST {volume_uri}/getcbt, paged.
GETCBT = "/getcbt"
CBT_PAGE_BLOCKS = 1 << 20  # blocks asked for per call (the answer may hold fewer: bitNum)
CBT_SECTOR_OF_BLOCK, CBT_BIT_NUM, CBT_BIT1_NUM, CBT_BITMAP = "sectorOfBlock", "bitNum", "bit1Num", "bitMap"
#: chgID meaning "since nothing": the whole allocated bitmap.
CHG_ID_FULL = "0"
SECTOR = 512

# Data channel: POST {volume_uri}/backupresources, then GET/DELETE .../backupresources/{id}.
BACKUP_RESOURCES = "/backupresources"
RESOURCE_ID = "id"
RES_URL, RES_HOST, RES_PORT, RES_TOKEN, RES_CA = "resourceUrl", "hostIP", "hostPort", "token", "caCert"
TRANS_MODES = ("lan", "lanssl")
