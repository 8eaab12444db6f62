//! The Lua scripts that make each operation atomic in Redis.
//!
//! Keys of a channel share the hash tag `{channel}`, so they live in one cluster slot:
//! `<prefix>{<channel>}:meta` (hash: `e` epoch, `s` last seq, `b` bytes kept), `<prefix>{<channel>}:stream`
//! (a Stream whose entry ids are `0-<seq>`, field `d` the payload) and
//! `<prefix>{<channel>}:idem:<key>` (the position of a keyed publish). Live events are
//! published on the Pub/Sub channel `<prefix>{<channel>}` as `<epoch>:<seq>:<payload>`.
//!
//! Only a publish creates a channel's keys. A channel without metadata (never published, or
//! forgotten) stands at seq 0 of the *shared epoch*, `<prefix>epoch`, one key for the whole
//! prefix, and the first publish gives the channel that epoch, so a subscriber that came in
//! at seq 0 replays from seq 1 without a reset. The shared epoch lives half as long as a
//! channel's metadata and is never refreshed: metadata made under it expires (at least
//! `meta ttl` after it was made) only after the shared epoch has changed, so seqs that start
//! over never reuse an epoch (`docs/decisions.md`, "The shared epoch").
//!
//! **Failovers.** Replication in Redis is asynchronous: a replica promoted after its primary
//! died may lack the primary's last acknowledged writes, while keeping the metadata of the
//! writes before them, so the next publishes would reuse the lost seqs in the same epoch and
//! a client that saw the lost events would be told it is up to date. Every script therefore
//! reads the node's replication history (`INFO replication`: `master_replid`, and
//! `master_replid2`, the history it continued when it was promoted) and each channel's
//! metadata records the history it was last used under (`r`). Data of the history this node
//! was promoted from, or of an unknown history on a node that was ever promoted, may have
//! lost its tail: the channel starts over in a new epoch at its next use (its clients get
//! `epoch_changed`), and so does the shared epoch (stored as `<epoch>|<replid>`). A restart
//! of a Redis that was never a replica keeps its data's word (it lost nothing with
//! `appendfsync always`; see `docs/scaling.md`).

/// The Lua functions every script begins with: the node's replication history, whether data
/// last used under another history may have lost its tail here, the shared epoch, and a
/// channel starting over.
macro_rules! replication_prelude {
    () => {
        r"
local NO_HISTORY = '0000000000000000000000000000000000000000'
local function replication()
  local info = redis.call('INFO', 'replication')
  return string.match(info, 'master_replid:(%x+)') or '', string.match(info, 'master_replid2:(%x+)') or NO_HISTORY
end
local function doubtful(written, current, previous)
  if not written or written == '' or written == current then return false end
  if written == previous then return true end
  return previous ~= NO_HISTORY
end
local function shared_epoch(key, candidate, ttl, current, previous)
  local value = redis.call('GET', key)
  if value then
    local epoch, written = string.match(value, '^([^|]+)|?(%x*)$')
    if epoch and not doubtful(written, current, previous) then
      if written ~= current then
        redis.call('SET', key, epoch .. '|' .. current, 'KEEPTTL')
      end
      return epoch
    end
  end
  redis.call('SET', key, candidate .. '|' .. current, 'PX', ttl)
  return candidate
end
local function start_over(meta, stream, epoch, current)
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 's', 0, 'b', 0, 'r', current)
end
"
    };
}

/// Publish: honour the idempotency key; a channel without metadata takes the shared epoch
/// (made now if missing) and drops any stream left behind; increment the seq, append to the
/// stream trimmed to the history size, refresh expiries, PUBLISH, remember the key.
///
/// KEYS: meta, stream, idempotency key (or a placeholder), shared epoch, keyed state (a hash
/// key → `epoch:seq:expires:data`, empty data for a deleted key), its keys (a sorted set, for
/// pages in key order). ARGV: payload, max events, stream ttl ms (0 = none), meta ttl ms,
/// epoch candidate, pub/sub channel, use idempotency (0/1), idempotency ttl ms, shared epoch
/// ttl ms, max bytes (0 = none), key ('' = not keyed), max keys, the entry's expiry (ms since
/// the Unix epoch, 0 = none), now (ms since the Unix epoch). A keyed publish past the bounds
/// (once the expired entries a scan of at most 4,096 meets are gone) returns
/// `{'!full', keys}` and writes nothing.
pub(crate) const PUBLISH: &str = concat!(
    replication_prelude!(),
    r"
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local epoch, seq = string.match(existing, '^([^:]+):(%d+)$')
    return {epoch, tonumber(seq)}
  end
end
local key = ARGV[11]
if key ~= '' and redis.call('HEXISTS', KEYS[5], key) == 0 then
  local keys = redis.call('HLEN', KEYS[5])
  if keys >= tonumber(ARGV[12]) then
    -- Expired keys and tombstones do not count: let go of those a bounded scan meets.
    local now = tonumber(ARGV[14])
    local cursor = '0'
    local looked = 0
    repeat
      local reply = redis.call('HSCAN', KEYS[5], cursor, 'COUNT', 512)
      cursor = reply[1]
      local fields = reply[2]
      for i = 1, #fields, 2 do
        local expires = tonumber(string.match(fields[i + 1], '^[^:]*:%d+:(%d+):'))
        if expires and expires > 0 and expires <= now then
          redis.call('HDEL', KEYS[5], fields[i])
          redis.call('ZREM', KEYS[6], fields[i])
        end
      end
      looked = looked + #fields / 2
    until cursor == '0' or looked >= 4096
    keys = redis.call('HLEN', KEYS[5])
    if keys >= tonumber(ARGV[12]) then
      return {'!full', keys}
    end
  end
end
local current, previous = replication()
local meta = redis.call('HMGET', KEYS[1], 'e', 'r')
local epoch = meta[1]
if epoch and doubtful(meta[2], current, previous) then
  epoch = ARGV[5]
  start_over(KEYS[1], KEYS[2], epoch, current)
  redis.call('DEL', KEYS[5], KEYS[6])
elseif not epoch then
  epoch = shared_epoch(KEYS[4], ARGV[5], ARGV[9], current, previous)
  start_over(KEYS[1], KEYS[2], epoch, current)
  redis.call('DEL', KEYS[5], KEYS[6])
elseif meta[2] ~= current then
  redis.call('HSET', KEYS[1], 'r', current)
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'b', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
local message = ARGV[1]
if key ~= '' then
  redis.call('XADD', KEYS[2], '0-' .. seq, 'd', ARGV[1], 'k', key)
  local data = ARGV[1]
  if data == 'null' then data = '' end
  redis.call('HSET', KEYS[5], key, epoch .. ':' .. seq .. ':' .. ARGV[13] .. ':' .. data)
  redis.call('ZADD', KEYS[6], 0, key)
  redis.call('PEXPIRE', KEYS[5], ARGV[4])
  redis.call('PEXPIRE', KEYS[6], ARGV[4])
  message = '#' .. key .. ' ' .. ARGV[1]
else
  redis.call('XADD', KEYS[2], '0-' .. seq, 'd', ARGV[1])
end
local bytes = redis.call('HINCRBY', KEYS[1], 'b', #ARGV[1])
local max_events = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[10])
local over = redis.call('XLEN', KEYS[2]) - max_events
if over > 0 or (max_bytes > 0 and bytes > max_bytes) then
  local cut = nil
  local from = '-'
  local done = false
  while not done do
    local batch = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', math.max(over, 16))
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      if over <= 0 and (max_bytes == 0 or bytes <= max_bytes) then
        done = true
        break
      end
      bytes = bytes - #entry[2][2]
      over = over - 1
      cut = entry[1]
    end
    from = '(' .. batch[#batch][1]
  end
  if cut then
    local cut_seq = tonumber(string.match(cut, '^0%-(%d+)$'))
    redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (cut_seq + 1))
    redis.call('HSET', KEYS[1], 'b', bytes)
  end
end
if tonumber(ARGV[3]) > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[6], epoch .. ':' .. seq .. ':' .. message)
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], epoch .. ':' .. seq, 'PX', ARGV[8])
end
return {epoch, seq}
"
);

/// The channel's position: its epoch and last seq, or seq 0 of the shared epoch when it has
/// no metadata. Creates no channel key (only the shared epoch, when it is missing) and
/// refreshes the expiry of metadata that exists, so a channel in use is kept.
///
/// Metadata whose history is doubtful starts over in a new epoch here (so a client behind a
/// lost tail is told at once, not at the next publish).
///
/// Used at the start of both scripts below; `meta ttl` and `shared epoch ttl` are ARGV[1] and
/// ARGV[2], the candidate epoch ARGV[3]; KEYS[1] is the metadata, KEYS[2] the shared epoch,
/// KEYS[3] the stream.
macro_rules! position_prelude {
    () => {
        r"
local function position()
  local current, previous = replication()
  local meta = redis.call('HMGET', KEYS[1], 'e', 's', 'r')
  if meta[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
    if doubtful(meta[3], current, previous) then
      start_over(KEYS[1], KEYS[3], ARGV[3], current)
      return ARGV[3], 0
    end
    if meta[3] ~= current then
      redis.call('HSET', KEYS[1], 'r', current)
    end
    return meta[1], tonumber(meta[2] or '0')
  end
  return shared_epoch(KEYS[2], ARGV[3], ARGV[2], current, previous), 0
end
"
    };
}

/// Position. KEYS: meta, shared epoch, stream. ARGV: meta ttl ms, shared epoch ttl ms, epoch
/// candidate.
pub(crate) const POSITION: &str = concat!(
    replication_prelude!(),
    position_prelude!(),
    r"
local epoch, seq = position()
return {epoch, seq}
"
);

/// A page of a keyed channel's state, with the position, in one step: the keys after `after`
/// in key order, at most `limit` and about 256 KiB; entries of another epoch and expired
/// ones are removed as they are met. KEYS: meta, shared epoch, stream, state, state keys.
/// ARGV: meta ttl ms, shared epoch ttl ms, epoch candidate, after ('' = from the first),
/// limit, now (ms since the Unix epoch). Returns {epoch, seq, more (0/1), last key read,
/// {key, seq, data, …}} (empty data: a deleted key).
pub(crate) const STATE: &str = concat!(
    replication_prelude!(),
    position_prelude!(),
    r"
local epoch, seq = position()
local from = '-'
if ARGV[4] ~= '' then from = '(' .. ARGV[4] end
local limit = tonumber(ARGV[5])
local now = tonumber(ARGV[6])
local keys = redis.call('ZRANGEBYLEX', KEYS[5], from, '+', 'LIMIT', 0, limit + 1)
local out = {}
local served = 0
local bytes = 0
local more = 0
local last = ''
for _, key in ipairs(keys) do
  if served == limit or bytes >= 262144 then
    more = 1
    break
  end
  local value = redis.call('HGET', KEYS[4], key)
  local e, s, x, data
  if value then
    e, s, x, data = string.match(value, '^([^:]*):(%d+):(%d+):(.*)$')
  end
  if not e or e ~= epoch or (tonumber(x) > 0 and tonumber(x) <= now) then
    redis.call('HDEL', KEYS[4], key)
    redis.call('ZREM', KEYS[5], key)
  else
    table.insert(out, key)
    table.insert(out, s)
    table.insert(out, data)
    served = served + 1
    bytes = bytes + #key + #data
  end
  last = key
end
if more == 0 and #keys > limit then
  -- Every key fetched was read, some removed: more may follow.
  more = 1
end
-- Kept as long as the channel's metadata is.
redis.call('PEXPIRE', KEYS[4], ARGV[1])
redis.call('PEXPIRE', KEYS[5], ARGV[1])
return {epoch, seq, more, last, out}
"
);

/// Read since: the position, then up to `limit` entries after `since_seq` when the epoch
/// matches; the caller decides replay, up-to-date or reset from the answer.
///
/// KEYS: meta, shared epoch, stream. ARGV: meta ttl ms, shared epoch ttl ms, epoch
/// candidate, since epoch, since seq, limit. Returns {epoch, last seq, entries} where entries
/// are XRANGE results.
pub(crate) const READ_SINCE: &str = concat!(
    replication_prelude!(),
    position_prelude!(),
    r"
local epoch, last = position()
local since = tonumber(ARGV[5])
if epoch ~= ARGV[4] or since >= last then
  return {epoch, last, {}}
end
local entries = redis.call('XRANGE', KEYS[3], '0-' .. (since + 1), '+', 'COUNT', ARGV[6])
return {epoch, last, entries}
"
);

/// Presence keys of a channel (same hash tag): `<prefix>{<channel>}:pconn`, a sorted set of
/// `<member id>\n<connection>` scored by expiry (ms since the Unix epoch);
/// `<prefix>{<channel>}:pcount`, each member's live connections; `<prefix>{<channel>}:pmem`,
/// each member's info (`-` when none, else `+<json>`). Joins and leaves are published on
/// `<prefix>{<channel>}:presence` as `j<member json>` / `l<member json>`.
///
/// The leave of one connection key, shared by LEAVE and SWEEP: removes it, and the member
/// when it was its last, publishing the leave. KEYS: pconn, pcount, pmem. Returns 1 when the
/// member left.
macro_rules! presence_leave_fn {
    () => {
        r"
local function leave_key(key, channel_name)
  if redis.call('ZREM', KEYS[1], key) == 0 then
    return 0
  end
  local member = string.match(key, '^(.*)\n')
  if redis.call('HINCRBY', KEYS[2], member, -1) > 0 then
    return 0
  end
  redis.call('HDEL', KEYS[2], member)
  local body = redis.call('HGET', KEYS[3], member)
  redis.call('HDEL', KEYS[3], member)
  if body then
    redis.call('PUBLISH', channel_name, 'l' .. body)
  end
  return 1
end
"
    };
}

/// Join. KEYS: pconn, pcount, pmem. ARGV: member id, connection, member json, expiry ms,
/// keys ttl ms, presence pub/sub name. Returns 1 when the member joined (its first live
/// connection).
pub(crate) const PRESENCE_JOIN: &str = r"
local key = ARGV[1] .. '\n' .. ARGV[2]
local added = redis.call('ZADD', KEYS[1], ARGV[4], key)
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[5]) end
if added == 0 then
  return 0
end
local count = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if count > 1 then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[6], 'j' .. ARGV[3])
return 1
";

/// Leave of one connection. KEYS: pconn, pcount, pmem. ARGV: member id, connection,
/// presence pub/sub name.
pub(crate) const PRESENCE_LEAVE: &str = concat!(
    presence_leave_fn!(),
    r"
return leave_key(ARGV[1] .. '\n' .. ARGV[2], ARGV[3])
"
);

/// Refresh: pushes the expiry of this instance's live connections forward (only those still
/// there: a swept one stays gone). KEYS: pconn, pcount, pmem. ARGV: expiry ms, keys ttl ms,
/// then the connection keys.
pub(crate) const PRESENCE_REFRESH: &str = r"
for index = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[index])
end
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ARGV[2]) end
return 0
";

/// Sweep: every connection whose expiry passed leaves (its instance died or lost Redis).
/// KEYS: pconn, pcount, pmem. ARGV: now ms, presence pub/sub name. Returns how many members
/// left.
pub(crate) const PRESENCE_SWEEP: &str = concat!(
    presence_leave_fn!(),
    r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
local left = 0
for _, key in ipairs(expired) do
  left = left + leave_key(key, ARGV[2])
end
return left
"
);
