//! The table of sections and keys, with defaults and checks, as in the operator's manual.
//! One macro turns it into typed structs, the parser's setters and the listing.

use super::value::{check, ConfigValue, Secret};

/// A typed value for callers that walk the config (Python, `config check`).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(u64),
    Str(String),
    /// A secret's real value; shown masked.
    Secret(String),
}

/// One key of a section as listed by [`Config::sections`].
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: &'static str,
    pub value: Value,
    /// The value as `config check` prints it (secrets masked).
    pub shown: String,
}

trait ToValue {
    fn to_value(&self) -> Value;
}
impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}
impl ToValue for u64 {
    fn to_value(&self) -> Value {
        Value::Int(*self)
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Str(self.clone())
    }
}
impl ToValue for Secret {
    fn to_value(&self) -> Value {
        Value::Secret(self.0.clone())
    }
}

macro_rules! config_schema {
    ($(
        $(#[$sm:meta])* [$sname:literal] $field:ident: $ty:ident {
            $( $(#[$km:meta])* $key:ident: $kty:ty = $default:expr $(, $check:expr)?; )*
        }
    )*) => {
        $(
            $(#[$sm])*
            #[derive(Clone, Debug, PartialEq)]
            pub struct $ty { $( $(#[$km])* pub $key: $kty, )* }

            impl Default for $ty {
                fn default() -> Self {
                    $ty { $( $key: $default.into(), )* }
                }
            }

            impl $ty {
                /// Sets one key from its raw text; `Ok(false)` for an unknown key.
                fn set(&mut self, key: &str, raw: &str) -> Result<bool, String> {
                    match key {
                        $( stringify!($key) => {
                            let v: $kty = ConfigValue::parse(raw)?;
                            $( ($check)(&v)?; )?
                            self.$key = v;
                            Ok(true)
                        } )*
                        _ => Ok(false),
                    }
                }

                fn is_secret(key: &str) -> bool {
                    match key {
                        $( stringify!($key) => <$kty as ConfigValue>::SECRET, )*
                        _ => false,
                    }
                }

                pub fn entries(&self) -> Vec<Entry> {
                    vec![ $( Entry {
                        key: stringify!($key),
                        value: self.$key.to_value(),
                        shown: self.$key.show(),
                    }, )* ]
                }
            }
        )*

        /// The whole `hamal.conf`.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct Config { $( pub $field: $ty, )* }

        impl Config {
            pub(super) fn has_section(&self, name: &str) -> bool {
                matches!(name, $( $sname )|*)
            }

            pub(super) fn set(&mut self, section: &str, key: &str, raw: &str) -> Result<bool, String> {
                match section {
                    $( $sname => self.$field.set(key, raw), )*
                    _ => Ok(false),
                }
            }

            pub fn is_secret(&self, section: &str, key: &str) -> bool {
                match section {
                    $( $sname => $ty::is_secret(key), )*
                    _ => false,
                }
            }

            /// Every section with its keys, in the manual's order.
            pub fn sections(&self) -> Vec<(&'static str, Vec<Entry>)> {
                vec![ $( ($sname, self.$field.entries()), )* ]
            }
        }
    };
}

config_schema! {
    /// Logging and local state.
    ["DEFAULT"] default: DefaultSection {
        debug: bool = false;
        verbose: bool = false;
        log_rotation_type: String = "size", check::one_of(&["size"]);
        max_logfile_count: u64 = 10u64, check::range(1, 1000);
        max_logfile_size_mb: u64 = 64u64, check::range(1, 10240);
        hamal_lib_dir: String = "/var/lib/hamal/", check::absolute_path;
        hamal_info_path: String = "/var/lib/hamal/hamal_info", check::absolute_path;
        /// Where the service writes its logs (the manual's /var/log/hamal).
        log_dir: String = "/var/log/hamal", check::absolute_path;
    }
    /// The periodic task loop and its load limits.
    ["period"] period: PeriodSection {
        interval: u64 = 60u64, check::range(1, 86400);
        task_update_wait_time: u64 = 1u64, check::range(0, 3600);
        /// Milliseconds of sleep per MB read from OpenStack.
        openstack_release_cpu_time: u64 = 0u64, check::range(0, 10000);
        /// Milliseconds of sleep per MB read from VMware.
        vmware_release_cpu_time: u64 = 0u64, check::range(0, 10000);
        /// Standalone task files (one per task, JSON or TOML).
        tasks_dir: String = "/etc/hamal/tasks.d", check::absolute_path;
        /// Retries of a failed cycle before it waits for the next interval.
        cycle_retries: u64 = 3u64, check::range(0, 100);
        /// Seconds between those retries.
        cycle_retry_delay: u64 = 60u64, check::range(1, 86400);
        /// Seconds a cycle's worker may go without reporting before it is killed.
        worker_silence_timeout: u64 = 600u64, check::range(5, 86400);
    }
    /// The control plane (Mass) client.
    ["mass"] mass: MassSection {
        mass_endpoint: String = "", check::url_or_empty;
        auth_key: Secret = Secret::default();
        hyper_exporter_id: String = "";
        public_key_path: String = "/etc/hamal/public_key", check::absolute_path;
        default_request_timeout: u64 = 600u64, check::range(1, 86400);
        enable_get_public_ips: bool = false;
        get_public_ip_timeout: u64 = 5u64, check::range(1, 600);
        enable_heartbeat_msg: bool = true;
        /// Folders (or devices) that targets of tasks from Mass may write, comma-separated;
        /// empty: `hamal_lib_dir` only. Task files may name any path.
        allowed_target_roots: String = "", check::absolute_paths_or_empty;
    }
    ["vmware"] vmware: VmwareSection {
        skip_disk_flag: bool = false;
        /// Minimum size of a flag disk, MB.
        disk_flag_size: u64 = 48u64, check::range(1, 1048576);
        /// 512-byte sectors per VDDK read.
        max_read_blocks: u64 = 1024u64, check::range(1, 65536);
        /// Where VMware's VDDK was unpacked (it holds lib64/libvixDiskLib.so.N).
        vddk_libdir: String = "/usr/lib/vmware-vix-disklib", check::absolute_path;
        /// VDDK transport modes, tried in order.
        transport_modes: String = "nbdssl:nbd";
    }
    ["openstack_ceph"] openstack_ceph: OpenstackCephSection {
        skip_disk_flag: bool = false;
        disk_flag_size: u64 = 48u64, check::range(1, 1048576);
    }
    ["sync"] sync: SyncSection {
        save_local_snapshot_metadata: bool = false;
        upload_metadata_to_oss: bool = false;
    }
    /// The data plane.
    ["data_sync_v2"] data_sync_v2: DataSyncV2Section {
        /// Seconds between target flushes (and journal appends) during a sync.
        fsync_period_frequency: u64 = 3u64, check::range(1, 3600);
        /// Seconds a flush may take before it is reported as slow; 0 = no limit.
        fsync_timeout: u64 = 0u64, check::range(0, 86400);
        parallel_sync_disks_count: u64 = 4u64, check::range(1, 256);
        pre_disk_readers_count: u64 = 2u64, check::range(1, 64);
        max_parallel_sync_disks_count: u64 = 16u64, check::range(1, 256);
        max_pre_disk_readers_count: u64 = 16u64, check::range(1, 64);
    }
    /// Chunk stores (`dir:` and `s3://` targets): how objects are written.
    ["store"] store: StoreSection {
        /// zstd level of stored chunks; 0 = no compression.
        compression_level: u64 = 3u64, check::range(0, 19);
        /// 32-byte key (raw or 64 hex digits) that encrypts new stores with AES-256-GCM.
        encryption_key_file: String = "", check::absolute_path_or_empty;
        /// Upload threads per disk.
        upload_threads: u64 = 8u64, check::range(1, 64);
        /// Seconds between the service's checks of a store (a share of its chunks re-read and
        /// re-hashed each time, damage quarantined for the next cycle to heal); 0 = never.
        verify_interval: u64 = 86400u64, check::range(0, 31536000);
        /// Seconds within which those checks read every chunk once.
        verify_full_period: u64 = 2592000u64, check::range(1, 31536000);
    }
    /// S3 connection of `s3://` stores; the AWS_* environment fills empty keys.
    ["s3"] s3: S3Section {
        endpoint: String = "", check::url_or_empty;
        region: String = "";
        access_key_id: String = "";
        secret_access_key: Secret = Secret::default();
        addressing_style: String = "path", check::one_of(&["path", "virtual"]);
        /// Extra CA certificate (PEM) to trust; TLS is always verified.
        ca_file: String = "", check::absolute_path_or_empty;
        /// Seconds one request may take.
        request_timeout: u64 = 60u64, check::range(1, 3600);
        /// Retries of a request that failed with 5xx, a timeout or a reset.
        max_retries: u64 = 5u64, check::range(0, 100);
    }
    /// The service's Prometheus endpoint.
    ["metrics"] metrics: MetricsSection {
        /// Address and port of `/metrics`; empty turns it off.
        listen: String = "127.0.0.1:9787", check::socket_addr_or_empty;
    }
    ["fusion_compute"] fusion_compute: FusionComputeSection {
        task_timeout: u64 = 3600u64, check::range(1, 604800);
        create_snap_task_timeout: u64 = 3600u64, check::range(1, 604800);
        delete_snap_task_timeout: u64 = 3600u64, check::range(1, 604800);
        local_host_ip: String = "", check::ip_or_empty;
        max_socket_connections_per_host: u64 = 8u64, check::range(1, 1024);
        max_writer_num: u64 = 10u64, check::range(1, 256);
    }
}

impl Config {
    /// Checks between keys, after every key is read.
    pub(super) fn check_relations(&self) -> Result<(), String> {
        let d = &self.data_sync_v2;
        if d.parallel_sync_disks_count > d.max_parallel_sync_disks_count {
            return Err(format!(
                "[data_sync_v2] parallel_sync_disks_count = {} must be <= max_parallel_sync_disks_count = {}",
                d.parallel_sync_disks_count, d.max_parallel_sync_disks_count
            ));
        }
        if d.pre_disk_readers_count > d.max_pre_disk_readers_count {
            return Err(format!(
                "[data_sync_v2] pre_disk_readers_count = {} must be <= max_pre_disk_readers_count = {}",
                d.pre_disk_readers_count, d.max_pre_disk_readers_count
            ));
        }
        Ok(())
    }

    /// `hamal.conf` text with every key at its current value (secrets masked), in the manual's layout.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (section, entries) in self.sections() {
            out.push_str(&format!("[{section}]\n"));
            for e in entries {
                out.push_str(&format!("{} = {}\n", e.key, e.shown));
            }
            out.push('\n');
        }
        out
    }
}
