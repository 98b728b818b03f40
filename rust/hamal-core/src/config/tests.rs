use super::*;

/// The manual's example file, comments and all.
const MANUAL: &str = r#"[DEFAULT]
debug = False                                # 是否启用调试日志
verbose = False
log_rotation_type = size
max_logfile_count = 10
max_logfile_size_mb = 64
hamal_lib_dir = /var/lib/hamal/
hamal_info_path = /var/lib/hamal/hamal_info

[period]
interval = 60
task_update_wait_time = 1
openstack_release_cpu_time = 0
vmware_release_cpu_time = 0

[mass]
mass_endpoint = https://127.0.0.1:10443/hypermotion/v1
auth_key = 315d65ca-ef28-4e63-ad72-1260a91adf23
hyper_exporter_id = aaeb0d1fbbb14093837fb5f900b9f8ce
public_key_path = /etc/hamal/public_key
default_request_timeout = 600
enable_get_public_ips = False
get_public_ip_timeout = 5
enable_heartbeat_msg = True

[vmware]
skip_disk_flag = False
disk_flag_size = 48
max_read_blocks = 1024

[openstack_ceph]
skip_disk_flag = False
disk_flag_size = 48

[sync]
save_local_snapshot_metadata = False
upload_metadata_to_oss = False

[data_sync_v2]
fsync_period_frequency = 3
fsync_timeout = 0
parallel_sync_disks_count = 4
pre_disk_readers_count = 2
max_parallel_sync_disks_count = 16
max_pre_disk_readers_count = 16

[fusion_compute]
task_timeout = 3600
create_snap_task_timeout = 3600
delete_snap_task_timeout = 3600
local_host_ip = ""                                           # 当前主机 IP（可选）
max_socket_connections_per_host = 8
max_writer_num = 10
"#;

#[test]
fn manual_example_parses_to_its_values_without_warnings() {
    let (c, warnings) = parse(MANUAL, "hamal.conf").unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(c.mass.auth_key.0, "315d65ca-ef28-4e63-ad72-1260a91adf23");
    assert_eq!(
        c.mass.mass_endpoint,
        "https://127.0.0.1:10443/hypermotion/v1"
    );
    assert!(c.mass.enable_heartbeat_msg);
    assert_eq!(c.fusion_compute.local_host_ip, "");
    assert!(!c.default.debug);
    let mut defaults = Config::default();
    defaults.mass.mass_endpoint = c.mass.mass_endpoint.clone();
    defaults.mass.auth_key = c.mass.auth_key.clone();
    defaults.mass.hyper_exporter_id = c.mass.hyper_exporter_id.clone();
    assert_eq!(c, defaults, "the manual's values are the defaults");
}

#[test]
fn render_masks_the_secret_and_round_trips() {
    let (c, _) = parse(MANUAL, "x").unwrap();
    let text = c.render();
    assert!(!text.contains("315d65ca"), "{text}");
    assert!(text.contains("auth_key = ********"));
    let (again, _) = parse(
        &text.replace("********", "315d65ca-ef28-4e63-ad72-1260a91adf23"),
        "x",
    )
    .unwrap();
    assert_eq!(again, c);
}

#[test]
fn bad_values_name_file_section_key_value_and_expectation() {
    for (section, line, want) in [
        (
            "DEFAULT",
            "debug = maybe",
            "[DEFAULT] debug = 'maybe': expected a boolean",
        ),
        (
            "period",
            "interval = 0",
            "[period] interval = '0': expected a whole number from 1 to 86400",
        ),
        (
            "period",
            "interval = soon",
            "[period] interval = 'soon': expected a whole number",
        ),
        (
            "mass",
            "mass_endpoint = ftp://x",
            "expected an http:// or https:// URL",
        ),
        (
            "DEFAULT",
            "log_rotation_type = daily",
            "expected one of: size",
        ),
        (
            "fusion_compute",
            "local_host_ip = 10.0.0.300",
            "expected an IP address or empty",
        ),
        (
            "s3",
            "addressing_style = dns",
            "expected one of: path, virtual",
        ),
        (
            "store",
            "compression_level = 30",
            "expected a whole number from 0 to 19",
        ),
        (
            "DEFAULT",
            "hamal_lib_dir = relative/dir",
            "expected an absolute path",
        ),
        (
            "data_sync_v2",
            "parallel_sync_disks_count = 17",
            "parallel_sync_disks_count = 17 must be <= max_parallel_sync_disks_count = 16",
        ),
        (
            "data_sync_v2",
            "pre_disk_readers_count = 20\nmax_pre_disk_readers_count = 8",
            "pre_disk_readers_count = 20 must be <=",
        ),
    ] {
        let e = parse(&format!("[{section}]\n{line}\n"), "/etc/hamal/hamal.conf")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/hamal/hamal.conf: ") && e.contains(want),
            "{line}: {e}"
        );
    }
}

#[test]
fn a_bad_secret_is_not_echoed() {
    // No secret has a check today; a broken INI line must not echo it either.
    let (c, _) = parse("[mass]\nauth_key = s3cr3t\n", "f").unwrap();
    assert!(!format!("{c:?}").contains("s3cr3t"));
}

#[test]
fn unknown_keys_and_sections_warn() {
    let (_, w) = parse("[period]\nintervall = 5\n[nosuch]\na = 1\n", "f").unwrap();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("unknown key 'intervall' in [period]"));
    assert!(w[1].contains("unknown section [nosuch]"));
}

#[test]
fn missing_file_means_defaults() {
    let l = load(std::path::Path::new("/nonexistent/hamal.conf")).unwrap();
    assert!(!l.found);
    assert_eq!(l.config, Config::default());
}

#[test]
fn a_key_set_twice_names_both_lines() {
    let text = "[period]\ninterval = 5\n\n[s3]\nregion = a\n[period]\ninterval = 6\n";
    let e = parse(text, "x.conf").unwrap_err().to_string();
    assert_eq!(
        e,
        "x.conf: [period] interval is set twice, on lines 2 and 7; keep one"
    );
    assert!(
        parse("[s3]\nfoo = 1\nfoo = 2\n", "y").is_err(),
        "unknown keys too"
    );
    assert!(parse("[period]\ninterval = 5\n[vmware]\ndisk_flag_size = 5\n[openstack_ceph]\ndisk_flag_size = 5\n", "z").is_ok());
}

#[test]
fn allowed_target_roots_must_be_absolute() {
    let bad = parse("[mass]\nallowed_target_roots = /srv/backups, x\n", "x.conf").unwrap_err();
    assert!(bad.to_string().contains("allowed_target_roots"), "{bad}");
    assert!(parse(
        "[mass]\nallowed_target_roots = /srv/a, /dev/sdb\n",
        "x.conf"
    )
    .is_ok());
}
