//! The Lua scripts that make each operation atomic in Redis.
//!
//! Keys of a channel share the hash tag `{channel}`, so they live in one cluster slot:
//! `<prefix>{<channel>}:meta` (hash: `e` epoch, `s` last seq), `<prefix>{<channel>}:stream`
//! (a Stream whose entry ids are `0-<seq>`, field `d` the payload) and
//! `<prefix>{<channel>}:idem:<key>` (the position of a keyed publish). Live events are
//! published on the Pub/Sub channel `<prefix>{<channel>}` as `<epoch>:<seq>:<payload>`.

/// Publish: honour the idempotency key, pick an epoch if the channel's metadata is missing
/// (first use, or lost: a new epoch makes old positions reset), increment the seq, append to
/// the stream trimmed to the history size, refresh expiries, PUBLISH, remember the key.
///
/// KEYS: meta, stream, idempotency key (or a placeholder). ARGV: payload, max events, stream
/// ttl ms (0 = none), meta ttl ms, epoch candidate, pub/sub channel, use idempotency (0/1),
/// idempotency ttl ms.
pub(crate) const PUBLISH: &str = r"
if ARGV[7] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local epoch, seq = string.match(existing, '^([^:]+):(%d+)$')
    return {epoch, tonumber(seq)}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '0-' .. seq, 'd', ARGV[1])
if tonumber(ARGV[3]) > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[6], epoch .. ':' .. seq .. ':' .. ARGV[1])
if ARGV[7] == '1' then
  redis.call('SET', KEYS[3], epoch .. ':' .. seq, 'PX', ARGV[8])
end
return {epoch, seq}
";

/// Position: the channel's epoch (chosen now if missing) and last seq.
///
/// KEYS: meta. ARGV: epoch candidate, meta ttl ms.
pub(crate) const POSITION: &str = r"
if redis.call('HSETNX', KEYS[1], 'e', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 's', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local meta = redis.call('HMGET', KEYS[1], 'e', 's')
return {meta[1], tonumber(meta[2] or '0')}
";

/// Read since: the position, then up to `limit` entries after `since_seq` when the epoch
/// matches; the caller decides replay, up-to-date or reset from the answer.
///
/// KEYS: meta, stream. ARGV: epoch candidate, meta ttl ms, since epoch, since seq, limit.
/// Returns {epoch, last seq, entries} where entries are XRANGE results.
pub(crate) const READ_SINCE: &str = r"
if redis.call('HSETNX', KEYS[1], 'e', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 's', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local meta = redis.call('HMGET', KEYS[1], 'e', 's')
local epoch = meta[1]
local last = tonumber(meta[2] or '0')
local since = tonumber(ARGV[4])
if epoch ~= ARGV[3] or since >= last then
  return {epoch, last, {}}
end
local entries = redis.call('XRANGE', KEYS[2], '0-' .. (since + 1), '+', 'COUNT', ARGV[5])
return {epoch, last, entries}
";
