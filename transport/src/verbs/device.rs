//! Device enumeration, and the choice of device, port and GID for a context.
//!
//! GIDs come from `ibv_query_gid`; their type ("RoCE v2", "IB/RoCE v1") and network device come
//! from sysfs (`/sys/class/infiniband/<dev>/ports/<port>/gid_attrs/{types,ndevs}/<index>`),
//! because rdma-core's `ibv_query_gid_ex` is an inline wrapper the bindings do not carry.
//! Only the first 256 GID indices are considered: `sgid_index` is 8 bits wide in an address vector.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::ptr::NonNull;

use rdma_sys as sys;
use serde::{Deserialize, Serialize};

use crate::{Error, OpenOptions, Result};

pub(crate) const LINK_LAYER_INFINIBAND: u8 = 1;
pub(crate) const LINK_LAYER_ETHERNET: u8 = 2;

const SYSFS: &str = "/sys/class/infiniband";
/// `sgid_index` is a `u8`: GIDs past this index cannot be used by a queue pair.
const MAX_GID_INDEX: usize = 256;
const ROCE_V2: &str = "RoCE v2";

const NO_DEVICE_HINT: &str = "/sys/class/infiniband is empty; load the driver of an RDMA NIC, or \
     create a Soft-RoCE device with `modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <if>` \
     (soft-roce/ has scripts)";

/// One GID table entry, as `rmem devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GidDesc {
    pub index: u8,
    /// The GID in IPv6 text form (`::ffff:10.0.2.15` for an IPv4-mapped RoCE GID).
    pub gid: String,
    /// "RoCE v2", "IB/RoCE v1", or `None` when sysfs does not say.
    pub gid_type: Option<String>,
    /// The network device carrying this GID (RoCE), if any.
    pub netdev: Option<String>,
}

/// One port of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortDesc {
    pub port: u8,
    /// "active", "down", "init", "armed", ...
    pub state: String,
    /// "ethernet" (RoCE, rxe) or "infiniband".
    pub link_layer: String,
    /// Active MTU in bytes.
    pub active_mtu: Option<u32>,
    pub lid: u16,
    pub gids: Vec<GidDesc>,
}

/// One RDMA device with its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDesc {
    pub name: String,
    /// Node GUID as 16 hex digits.
    pub node_guid: String,
    pub ports: Vec<PortDesc>,
}

/// Several lines: the device, then each port and its GIDs, indented.
impl std::fmt::Display for DeviceDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (node GUID {})", self.name, self.node_guid)?;
        for p in &self.ports {
            write!(f, "\n  port {}: {}, {}", p.port, p.state, p.link_layer)?;
            if let Some(mtu) = p.active_mtu {
                write!(f, ", MTU {mtu}")?;
            }
            if p.link_layer == "infiniband" {
                write!(f, ", LID {}", p.lid)?;
            }
            for g in &p.gids {
                write!(
                    f,
                    "\n    GID {:>3}  {:<40} {:<11} {}",
                    g.index,
                    g.gid,
                    g.gid_type.as_deref().unwrap_or("-"),
                    g.netdev.as_deref().unwrap_or("-")
                )?;
            }
        }
        Ok(())
    }
}

/// Lists every RDMA device, its ports and their GIDs (an empty list when there are none).
pub fn devices() -> Result<Vec<DeviceDesc>> {
    let list = DeviceList::get()?;
    let mut out = Vec::with_capacity(list.len());
    for (dev, name) in list.iter() {
        let ctx = Ctx::open(dev, &name)?;
        let attr = ctx.query_device()?;
        let mut ports = Vec::new();
        for port in 1..=attr.phys_port_cnt {
            let pa = ctx.query_port(port)?;
            ports.push(PortDesc {
                port,
                state: port_state(pa.state).into(),
                link_layer: match pa.link_layer {
                    LINK_LAYER_ETHERNET => "ethernet".into(),
                    LINK_LAYER_INFINIBAND => "infiniband".into(),
                    other => format!("unknown ({other})"),
                },
                active_mtu: mtu_bytes(pa.active_mtu),
                lid: pa.lid,
                gids: ctx.gids(&name, port, pa.gid_tbl_len)?,
            });
        }
        out.push(DeviceDesc {
            node_guid: format!("{:016x}", u64::from_be(attr.node_guid)),
            name,
            ports,
        });
    }
    Ok(out)
}

fn port_state(s: sys::ibv_port_state::Type) -> &'static str {
    use sys::ibv_port_state::*;
    match s {
        IBV_PORT_DOWN => "down",
        IBV_PORT_INIT => "init",
        IBV_PORT_ARMED => "armed",
        IBV_PORT_ACTIVE => "active",
        IBV_PORT_ACTIVE_DEFER => "active-defer",
        _ => "nop",
    }
}

/// `enum ibv_mtu` (1..=5) in bytes.
pub(crate) fn mtu_bytes(mtu: sys::ibv_mtu::Type) -> Option<u32> {
    (1..=5).contains(&mtu).then(|| 128 << mtu)
}

/// The GID a RoCE port derives from an IP address.
pub(crate) fn ip_gid(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The list from `ibv_get_device_list`, freed on drop.
struct DeviceList {
    list: *mut *mut sys::ibv_device,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<DeviceList> {
        let mut n = 0;
        // SAFETY: `n` is a valid out-pointer; the returned list is freed in Drop.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        if list.is_null() {
            let e = io::Error::last_os_error();
            // Without any RDMA driver the kernel has no uverbs ABI and libibverbs reports
            // ENOSYS (or ENOENT for a missing sysfs class): that is "no device", not a failure.
            if e.raw_os_error() == Some(libc::ENOMEM) {
                return Err(Error::os("ibv_get_device_list", e));
            }
            return Ok(DeviceList {
                list: std::ptr::null_mut(),
                len: 0,
            });
        }
        Ok(DeviceList {
            list,
            len: usize::try_from(n).unwrap_or(0),
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> impl Iterator<Item = (*mut sys::ibv_device, String)> + '_ {
        (0..self.len).map(|i| {
            // SAFETY: i < len entries of the list, which lives as long as `self`.
            let dev = unsafe { *self.list.add(i) };
            // SAFETY: `dev` is a device of the live list; the name is a NUL-terminated string
            // owned by it, copied out at once.
            let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            (dev, name)
        })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if !self.list.is_null() {
            // SAFETY: the list came from ibv_get_device_list and is freed once; opened contexts
            // stay valid after the list is freed.
            unsafe { sys::ibv_free_device_list(self.list) };
        }
    }
}

/// An open device context, closed on drop (after every object made from it: they hold an Arc
/// to the [`Device`] that owns this).
pub(crate) struct Ctx(NonNull<sys::ibv_context>);

// SAFETY: libibverbs contexts are thread-safe; the pointer is only used through verbs calls.
unsafe impl Send for Ctx {}
// SAFETY: as above.
unsafe impl Sync for Ctx {}

impl Ctx {
    fn open(dev: *mut sys::ibv_device, name: &str) -> Result<Ctx> {
        // SAFETY: `dev` comes from a live device list.
        let p = unsafe { sys::ibv_open_device(dev) };
        NonNull::new(p).map(Ctx).ok_or_else(|| {
            let e = io::Error::last_os_error();
            tracing::warn!(device = name, error = %e, "ibv_open_device failed");
            Error::os("ibv_open_device", e)
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_context {
        self.0.as_ptr()
    }

    fn query_device(&self) -> Result<sys::ibv_device_attr> {
        // SAFETY: ibv_device_attr is plain data; zero is a valid value.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let rc = unsafe { sys::ibv_query_device(self.as_ptr(), &mut attr) };
        if rc != 0 {
            return Err(Error::os(
                "ibv_query_device",
                io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(attr)
    }

    fn query_port(&self, port: u8) -> Result<sys::ibv_port_attr> {
        // SAFETY: ibv_port_attr is plain data; zero is a valid value.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer. `___ibv_query_port` is rdma-sys's version of the
        // C inline `ibv_query_port` (the exported symbol takes the old, smaller struct).
        let rc = unsafe { sys::___ibv_query_port(self.as_ptr(), port, &mut attr) };
        if rc != 0 {
            return Err(Error::os(
                "ibv_query_port",
                io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(attr)
    }

    fn query_gid(&self, port: u8, index: u8) -> Result<[u8; 16]> {
        let mut gid = sys::ibv_gid { raw: [0; 16] };
        // SAFETY: valid context and out-pointer.
        let rc = unsafe { sys::ibv_query_gid(self.as_ptr(), port, index.into(), &mut gid) };
        if rc != 0 {
            return Err(Error::last_os("ibv_query_gid"));
        }
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        Ok(unsafe { gid.raw })
    }

    /// The non-empty GIDs of a port with their sysfs type and netdev.
    fn gids(&self, name: &str, port: u8, tbl_len: i32) -> Result<Vec<GidDesc>> {
        let n = usize::try_from(tbl_len).unwrap_or(0).min(MAX_GID_INDEX);
        let mut out = Vec::new();
        for index in 0..n {
            let index = index as u8;
            let gid = self.query_gid(port, index)?;
            if gid == [0; 16] {
                continue;
            }
            out.push(GidDesc {
                index,
                gid: Ipv6Addr::from(gid).to_string(),
                gid_type: gid_attr(name, port, "types", index),
                netdev: gid_attr(name, port, "ndevs", index),
            });
        }
        Ok(out)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context is closed once, after every child object (they keep it alive).
        let rc = unsafe { sys::ibv_close_device(self.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_close_device failed");
        }
    }
}

fn gid_attr(dev: &str, port: u8, what: &str, index: u8) -> Option<String> {
    let path = format!("{SYSFS}/{dev}/ports/{port}/gid_attrs/{what}/{index}");
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// An open device with the port and GID every queue pair of the context uses.
pub(crate) struct Device {
    pub(crate) ctx: Ctx,
    pub(crate) name: String,
    pub(crate) port: u8,
    pub(crate) link_layer: u8,
    pub(crate) lid: u16,
    pub(crate) gid_index: u8,
    pub(crate) gid: [u8; 16],
    /// `enum ibv_mtu` of the port.
    pub(crate) active_mtu: sys::ibv_mtu::Type,
    pub(crate) max_msg: u64,
    pub(crate) max_qp_wr: u32,
    pub(crate) max_sge: u32,
    pub(crate) max_cqe: u32,
    /// RDMA READ/atomic depth as responder (max_dest_rd_atomic), 1..=16.
    pub(crate) max_dest_rd_atomic: u8,
    /// RDMA READ/atomic depth as initiator (max_rd_atomic), 1..=16.
    pub(crate) max_rd_atomic: u8,
}

/// Whether any verbs device is present (the provider's probe).
pub(crate) fn any_device() -> Result<()> {
    if DeviceList::get()?.len() == 0 {
        return Err(Error::NoDevice {
            hint: NO_DEVICE_HINT.into(),
        });
    }
    Ok(())
}

impl Device {
    /// Opens the device, port and GID that `opts` asks for (see the module docs of `verbs`).
    pub(crate) fn open(opts: &OpenOptions) -> Result<Device> {
        let list = DeviceList::get()?;
        if list.len() == 0 {
            return Err(Error::NoDevice {
                hint: NO_DEVICE_HINT.into(),
            });
        }
        let candidates: Vec<_> = list
            .iter()
            .filter(|(_, n)| match &opts.device {
                Some(want) => want == n,
                None => true,
            })
            .collect();
        if let (Some(want), true) = (&opts.device, candidates.is_empty()) {
            return Err(Error::DeviceNotFound(want.clone()));
        }
        if let (None, Some(ip)) = (opts.gid_index, opts.local_ip) {
            let want = ip_gid(ip);
            for (dev, name) in candidates {
                let ctx = Ctx::open(dev, &name)?;
                let attr = ctx.query_device()?;
                let ports = match opts.port {
                    Some(p) => p..=p,
                    None => 1..=attr.phys_port_cnt,
                };
                for port in ports {
                    let pa = ctx.query_port(port)?;
                    let found = ctx
                        .gids(&name, port, pa.gid_tbl_len)?
                        .into_iter()
                        .find(|g| {
                            g.gid_type.as_deref() == Some(ROCE_V2)
                                && g.gid.parse::<Ipv6Addr>().map(|a| a.octets()) == Ok(want)
                        });
                    if let Some(g) = found {
                        return Device::finish(ctx, name, port, Some(g.index), &attr, &pa);
                    }
                }
            }
            return Err(Error::NoGid(ip));
        }
        let (dev, name) = candidates
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoDevice {
                hint: NO_DEVICE_HINT.into(),
            })?;
        let ctx = Ctx::open(dev, &name)?;
        let attr = ctx.query_device()?;
        let port = opts.port.unwrap_or(1);
        if port == 0 || port > attr.phys_port_cnt {
            return Err(Error::InvalidArgument(format!(
                "{name} has {} port(s); port {port} does not exist",
                attr.phys_port_cnt
            )));
        }
        let pa = ctx.query_port(port)?;
        Device::finish(ctx, name, port, opts.gid_index, &attr, &pa)
    }

    fn finish(
        ctx: Ctx,
        name: String,
        port: u8,
        gid_index: Option<u8>,
        attr: &sys::ibv_device_attr,
        pa: &sys::ibv_port_attr,
    ) -> Result<Device> {
        if pa.state != sys::ibv_port_state::IBV_PORT_ACTIVE {
            tracing::warn!(device = %name, port, state = port_state(pa.state), "port is not active");
        }
        let gid_index = match (gid_index, pa.link_layer) {
            (Some(i), _) => i,
            (None, LINK_LAYER_ETHERNET) => default_roce_gid(&ctx, &name, port, pa.gid_tbl_len)?,
            (None, _) => 0,
        };
        let gid = ctx.query_gid(port, gid_index)?;
        if pa.link_layer == LINK_LAYER_ETHERNET && gid == [0; 16] {
            return Err(Error::InvalidArgument(format!(
                "GID index {gid_index} of {name} port {port} is empty"
            )));
        }
        let clamp = |v: i32| v.clamp(1, 16) as u8;
        let dev = Device {
            ctx,
            port,
            link_layer: pa.link_layer,
            lid: pa.lid,
            gid_index,
            gid,
            active_mtu: pa.active_mtu,
            max_msg: u64::from(pa.max_msg_sz),
            max_qp_wr: u32::try_from(attr.max_qp_wr).unwrap_or(0),
            max_sge: u32::try_from(attr.max_sge).unwrap_or(0),
            max_cqe: u32::try_from(attr.max_cqe).unwrap_or(0),
            max_dest_rd_atomic: clamp(attr.max_qp_rd_atom),
            max_rd_atomic: clamp(attr.max_qp_init_rd_atom),
            name,
        };
        tracing::debug!(device = %dev.name, port, gid_index, gid = %Ipv6Addr::from(gid), "opened verbs device");
        Ok(dev)
    }

    pub(crate) fn is_roce(&self) -> bool {
        self.link_layer == LINK_LAYER_ETHERNET
    }

    pub(crate) fn gid_text(&self) -> String {
        Ipv6Addr::from(self.gid).to_string()
    }
}

/// The first RoCE v2 GID of an Ethernet port, preferring routable ones over link-local
/// (`fe80::/10`) ones.
fn default_roce_gid(ctx: &Ctx, name: &str, port: u8, tbl_len: i32) -> Result<u8> {
    let v2: Vec<GidDesc> = ctx
        .gids(name, port, tbl_len)?
        .into_iter()
        .filter(|g| g.gid_type.as_deref() == Some(ROCE_V2))
        .collect();
    let link_local = |g: &GidDesc| {
        g.gid
            .parse::<Ipv6Addr>()
            .is_ok_and(|a| a.segments()[0] & 0xffc0 == 0xfe80)
    };
    v2.iter()
        .find(|g| !link_local(g))
        .or_else(|| v2.first())
        .map(|g| g.index)
        .ok_or_else(|| Error::NoDevice {
            hint: format!(
                "{name} port {port} has no RoCE v2 GID: give its network interface an IP \
                 address, or choose a GID with gid_index"
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_of_ip() {
        let v4: IpAddr = "10.0.2.15".parse().unwrap();
        let g = ip_gid(v4);
        assert_eq!(Ipv6Addr::from(g).to_string(), "::ffff:10.0.2.15");
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(Ipv6Addr::from(ip_gid(v6)).to_string(), "fd00::1");
    }

    #[test]
    fn mtu_enum_to_bytes() {
        assert_eq!(mtu_bytes(sys::ibv_mtu::IBV_MTU_256), Some(256));
        assert_eq!(mtu_bytes(sys::ibv_mtu::IBV_MTU_4096), Some(4096));
        assert_eq!(mtu_bytes(0), None);
    }
}
