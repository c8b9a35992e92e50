//! The virtio-blk device model.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskImage;
use super::features::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use super::request::{handle_chain_counted, BlockStats};
use super::{
    BlockError, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SHIFT, SEG_MAX, SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use crate::virtio::device_core::{CoreDevice, DeviceCore};
use crate::virtio::{device_type, COMMON_FEATURES};

/// How to build a [`Block`] device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw disk image (regular file or block device), size a multiple of 512 bytes.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes). Default: derived from the image's device
    /// and inode numbers.
    pub id: Option<String>,
}

/// A virtio-blk device over a raw image file, with one request queue.
#[derive(Debug)]
pub struct Block {
    disk: DiskImage,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    stats: BlockStats,
    pub(super) core: DeviceCore,
}

/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SPACE_SIZE: usize = 60;

fn build_config_space(nsectors: u64) -> Vec<u8> {
    // struct virtio_blk_config (virtio 1.2 §5.2.4).
    let mut config = Vec::with_capacity(CONFIG_SPACE_SIZE);
    config.extend_from_slice(&nsectors.to_le_bytes()); // 0: capacity
    config.extend_from_slice(&SIZE_MAX.to_le_bytes()); // 8: size_max
    config.extend_from_slice(&SEG_MAX.to_le_bytes()); // 12: seg_max
    config.extend_from_slice(&[0u8; 4]); // 16: geometry
    config.extend_from_slice(&(1u32 << SECTOR_SHIFT).to_le_bytes()); // 20: blk_size (SECTOR_SIZE)
    config.extend_from_slice(&[0u8; 8]); // 24: topology
    config.extend_from_slice(&[0u8; 4]); // 32: writeback, unused0, num_queues
    config.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // 36
    config.extend_from_slice(&MAX_DISCARD_SEG.to_le_bytes()); // 40
    config.extend_from_slice(&DISCARD_SECTOR_ALIGNMENT.to_le_bytes()); // 44
    config.extend_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes()); // 48
    config.extend_from_slice(&MAX_WRITE_ZEROES_SEG.to_le_bytes()); // 52
    config.extend_from_slice(&[1u8, 0, 0, 0]); // 56: write_zeroes_may_unmap, unused1
    debug_assert_eq!(config.len(), CONFIG_SPACE_SIZE);
    config
}

impl Block {
    /// What the device did so far.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// Switches the backing image (Firecracker's `PATCH /drives/{id}` with `path_on_host`),
    /// keeping the device's read-only mode. The old image is synced first (what the guest
    /// wrote must be on it before it goes), and the new one locked. The new size is published
    /// in config space and the driver is told with a config-change interrupt. On error the old
    /// image stays in use.
    ///
    /// The same file again (a manager announcing a resized image) is reopened; its lock moves
    /// to the new open once the old one is closed.
    pub fn set_backing(&mut self, path: &std::path::Path) -> Result<(), BlockError> {
        let read_only = self.disk.read_only();
        let same_file = self.disk.is_file_at(path);
        let mut disk = if same_file {
            DiskImage::open_unlocked(path, read_only)?
        } else {
            DiskImage::open(path, read_only)?
        };
        self.disk.flush().map_err(BlockError::SyncBeforeSwitch)?;
        disk.set_write_through(self.disk.write_through());
        let nsectors = disk.nsectors();
        // Dropping the old image closes it and releases its lock.
        self.disk = disk;
        if same_file {
            if let Err(e) = self.disk.lock(path) {
                log::warn!("virtio-blk: {e}");
            }
        }
        self.core.update_config(build_config_space(nsectors));
        Ok(())
    }

    /// Open the image and build the device.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let id = match &config.id {
            Some(id) if id.len() > VIRTIO_BLK_ID_BYTES => {
                return Err(BlockError::IdTooLong {
                    id: id.clone(),
                    len: id.len(),
                })
            }
            Some(id) => Some(id.clone()),
            None => None,
        };
        let disk = DiskImage::open(&config.path, config.read_only)?;
        let id = id.unwrap_or_else(|| match disk.file().metadata() {
            Ok(meta) => format!("{:x}{:x}", meta.dev(), meta.ino()),
            Err(_) => String::new(),
        });
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut avail_features = COMMON_FEATURES
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX);
        if config.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config_space = build_config_space(disk.nsectors());
        let core = DeviceCore::new("virtio-blk", avail_features, config_space, &[QUEUE_SIZE])
            .map_err(BlockError::EventFd)?;
        Ok(Block {
            disk,
            id: id_bytes,
            stats: BlockStats::default(),
            core,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        self.disk.nsectors()
    }

    /// The 20-byte device ID returned by GET_ID.
    pub fn id(&self) -> &[u8; VIRTIO_BLK_ID_BYTES] {
        &self.id
    }

    /// Written once per activation; the event loop reacts by registering the queue events.
    pub fn activate_event(&self) -> &EventFd {
        self.core.activate_event()
    }

    /// Process every available request of queue `index`, then notify the guest if needed. A
    /// no-op when the device is not active or the queue does not exist / is not ready.
    pub fn process_queue(&mut self, index: usize) {
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let (disk, id, stats) = (&mut self.disk, &self.id, &mut self.stats);
        active.drain_queue(index, |chain, mem| {
            handle_chain_counted(chain, mem, disk, id, stats)
        });
    }
}

impl CoreDevice for Block {
    const DEVICE_TYPE: u32 = device_type::BLOCK;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    /// A driver that did not negotiate VIRTIO_BLK_F_FLUSH has a write-through device: every
    /// write is durable before it completes.
    fn before_activate(&mut self) {
        self.disk
            .set_write_through(!self.core.acked(VIRTIO_BLK_F_FLUSH));
    }
}

#[cfg(test)]
mod tests;
