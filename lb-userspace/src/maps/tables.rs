//! The Maglev tables: two blocks per VIP in `MAGLEV_V2`, the one in use and the spare one a
//! new table is written into before the VIP's entry switches to it; and the tables of the
//! version before, carried over at an upgrade.

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{MAGLEV_MAX_SIZE, Service, VipKey, VipKey6, maps};

use super::{Maps, MapsError, batch, entries, op, typed};

/// How long after a service's entry changed its old block may be written again: far longer
/// than any XDP program run that read the entry before the change (microseconds).
const BLOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(10);

impl Maps {
    /// The Maglev table of a service: the first `table_size` slots of its current block.
    pub fn maglev_table(&self, service: &Service) -> Result<Vec<u32>, MapsError> {
        self.read_block(service.block, service.table_size)
    }

    fn read_block(&self, block: u32, size: u32) -> Result<Vec<u32>, MapsError> {
        batch::lookup(&self.maglev, block * MAGLEV_MAX_SIZE, size)
            .map_err(batch_error(maps::MAGLEV.name))
    }

    /// The first `size` slots of a block: what this process last wrote there, else read
    /// back (in batches).
    pub fn block_table(&mut self, block: u32, size: u32) -> Result<Vec<u32>, MapsError> {
        if let Some(t) = self.tables.get(&block).filter(|t| t.len() == size as usize) {
            return Ok(t.clone());
        }
        let table = self.read_block(block, size)?;
        self.tables.insert(block, table.clone());
        Ok(table)
    }

    /// Makes a block hold `table`, writing only the slots that differ; returns how many it
    /// wrote. The block must not be in use: the data path switches to it when the service's
    /// entry names it (`set_service`).
    pub fn write_table(&mut self, block: u32, table: &[u32]) -> Result<usize, MapsError> {
        let old = self.block_table(block, table.len() as u32)?;
        let changed = crate::maglev::diff(&old, table);
        self.write_slots(block, &changed)?;
        self.tables.insert(block, table.to_vec());
        Ok(changed.len())
    }

    /// Brings the block `service` does not use up to the table it uses, so that the next
    /// change writes only the slots it changes; not within `BLOCK_GRACE` of the entry's last
    /// change (a packet may still be reading that block). Returns the slots written.
    pub fn catch_up(&mut self, service: &Service) -> Result<usize, MapsError> {
        if self
            .switched
            .get(&service.id)
            .is_some_and(|t| t.elapsed() < BLOCK_GRACE)
        {
            return Ok(0);
        }
        let active = self.block_table(service.block, service.table_size)?;
        self.write_table(Service::other_block(service.block), &active)
    }

    /// Waits out what is left of `BLOCK_GRACE` since the service's entry last changed, so its
    /// spare block (the one in use until then) may be written: two table changes within
    /// 10 ms (instances exiting together) keep the second one's writes off a block that
    /// packets may still be reading.
    pub fn await_spare(&self, service_id: u32) {
        if let Some(left) = self
            .switched
            .get(&service_id)
            .and_then(|t| BLOCK_GRACE.checked_sub(t.elapsed()))
        {
            std::thread::sleep(left);
        }
    }

    /// `catch_up` for every VIP (the state task's tick).
    pub fn catch_up_all(&mut self) -> Result<usize, MapsError> {
        let mut written = 0;
        for (_, service) in self.services()? {
            written += self.catch_up(&service)?;
        }
        Ok(written)
    }

    /// Writes the given (slot, backend id) pairs of a block, in batches.
    pub fn write_slots(&mut self, block: u32, slots: &[(u32, u32)]) -> Result<(), MapsError> {
        // Known again only once written whole (`write_table`).
        self.tables.remove(&block);
        let base = block * MAGLEV_MAX_SIZE;
        let (keys, ids): (Vec<u32>, Vec<u32>) =
            slots.iter().map(|&(slot, id)| (base + slot, id)).unzip();
        batch::update(&self.maglev, &keys, &ids).map_err(batch_error(maps::MAGLEV.name))
    }

    /// Carries the VIP tables of the version before into this one's maps: each service of
    /// the old `SERVICES`/`SERVICES6` (values: id, table size) gets its old block of `MAGLEV`
    /// as its first block here, then its entry. Returns the services carried.
    pub fn carry_tables(
        &mut self,
        services: Option<Map>,
        services6: Option<Map>,
        maglev: Map,
    ) -> Result<usize, MapsError> {
        let old_maglev: Array<MapData, u32> = typed("MAGLEV", maglev)?;
        let read = |id: u32, size: u32| -> Result<Vec<u32>, MapsError> {
            batch::lookup(&old_maglev, id * MAGLEV_MAX_SIZE, size).map_err(batch_error("MAGLEV"))
        };
        // Each old service in its first block, with its old table.
        let carry = |id: u32, table_size: u32| -> Result<(Service, Vec<u32>), MapsError> {
            let service = Service {
                id,
                table_size,
                block: Service::first_block(id),
                _pad: 0,
            };
            Ok((service, read(id, table_size)?))
        };
        let v4 = match services {
            Some(map) => {
                let old: HashMap<MapData, VipKey, [u32; 2]> = typed("SERVICES", map)?;
                entries(&old, "SERVICES")?
                    .into_iter()
                    .map(|(k, [id, size])| Ok((k, carry(id, size)?)))
                    .collect::<Result<Vec<_>, MapsError>>()?
            }
            None => Vec::new(),
        };
        let v6 = match services6 {
            Some(map) => {
                let old: HashMap<MapData, VipKey6, [u32; 2]> = typed("SERVICES6", map)?;
                entries(&old, "SERVICES6")?
                    .into_iter()
                    .map(|(k, [id, size])| Ok((k, carry(id, size)?)))
                    .collect::<Result<Vec<_>, MapsError>>()?
            }
            None => Vec::new(),
        };
        // Tables first, then the entries that make them visible.
        for (service, table) in v4.iter().map(|(_, c)| c).chain(v6.iter().map(|(_, c)| c)) {
            self.write_table(service.block, table)?;
        }
        for (key, (service, _)) in &v4 {
            self.services
                .insert(key, service, 0)
                .map_err(op("writing", maps::SERVICES.name))?;
        }
        for (key, (service, _)) in &v6 {
            self.services6
                .insert(key, service, 0)
                .map_err(op("writing", maps::SERVICES6.name))?;
        }
        let carried = v4.len() + v6.len();
        Ok(carried)
    }
}

fn batch_error(name: &'static str) -> impl FnOnce(batch::BatchError) -> MapsError {
    move |source| MapsError::Batch { name, source }
}
