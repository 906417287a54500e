#![cfg(feature = "verbs")]
//! The verbs provider on a host with or without RDMA devices: opening fails with a typed error
//! when there is nothing to open, and succeeds when there is.

use rmem_transport::{open, verbs, Error, OpenOptions, Provider};

fn sysfs_has_devices() -> bool {
    std::fs::read_dir("/sys/class/infiniband")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

#[test]
fn open_without_devices_is_no_device() {
    let r = open(&OpenOptions::new(Provider::Verbs));
    let list = verbs::devices().expect("listing devices never fails for lack of them");
    if sysfs_has_devices() {
        let ctx = r.expect("a device is present, so opening the first one succeeds");
        assert_eq!(ctx.provider(), Provider::Verbs);
        assert!(
            !list.is_empty(),
            "sysfs lists devices but devices() does not"
        );
        assert!(list.iter().any(|d| d.name == ctx.device().name));
    } else {
        match r {
            Err(Error::NoDevice { hint }) => {
                assert!(hint.contains("rdma_rxe"), "hint names Soft-RoCE: {hint}")
            }
            Err(e) => panic!("expected NoDevice, got {e:?}"),
            Ok(_) => panic!("opened a verbs device on a host without one"),
        }
        assert!(list.is_empty(), "devices() listed {list:?}");
        // The list is what `rmem devices --json` prints.
        assert_eq!(serde_json::to_string(&list).unwrap(), "[]");
    }
}

#[test]
fn named_missing_device_is_not_found() {
    let opts = OpenOptions::new(Provider::Verbs).device("rmem-no-such-device0");
    match open(&opts) {
        Err(Error::DeviceNotFound(name)) => assert_eq!(name, "rmem-no-such-device0"),
        Err(Error::NoDevice { .. }) => assert!(!sysfs_has_devices()),
        Err(e) => panic!("expected DeviceNotFound or NoDevice, got {e:?}"),
        Ok(_) => panic!("opened a device that does not exist"),
    }
}

#[test]
fn unknown_address_has_no_gid() {
    // 192.0.2.0/24 is TEST-NET-1: no interface carries it.
    let ip = "192.0.2.77".parse().unwrap();
    let opts = OpenOptions::new(Provider::Verbs).local_ip(ip);
    match open(&opts) {
        Err(Error::NoGid(got)) => assert_eq!(got, ip),
        Err(Error::NoDevice { .. }) => assert!(!sysfs_has_devices()),
        Err(e) => panic!("expected NoGid or NoDevice, got {e:?}"),
        Ok(_) => panic!("found a RoCE v2 GID for a documentation address"),
    }
}
