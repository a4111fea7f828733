#!lua name=hub
-- The hub's Redis Function library: channel history (docs/history-format.md is the contract)
-- and presence (docs/presence-format.md; the section "Presence" below).
--
-- Every function takes ONE declared key K = <prefix><channel> (no braces in it) and touches
-- only keys that hash to K's slot ({K} is the hash tag):
--   {K}:m           hash: o = last offset, e = epoch; lives meta_ttl after the last write
--   {K}:s           stream: entry ID <offset>-0, field d = payload; exact MAXLEN <size>;
--                   expires <ttl> after the last publish
--   {K}:i:<key>     string "<offset>:<epoch>": an idempotency key, 300 s
-- and publishes "<offset>:<epoch>:<payload>" on the pub/sub channel {K}:h (SPUBLISH when the
-- server runs in cluster mode, else PUBLISH).

local VERSION = 3
local DEFAULT_META_TTL = 30 * 24 * 3600  -- seconds
local IDEMPOTENCY_TTL = 300              -- seconds

local cluster_mode = nil  -- cached: cluster-enabled cannot change while the server runs

local function is_cluster()
  if cluster_mode == nil then
    local info = redis.call('INFO', 'cluster')
    cluster_mode = string.match(info, 'cluster_enabled:(%d)') == '1'
  end
  return cluster_mode
end

local function base_of(key)
  if string.find(key, '[{}]') then
    return redis.error_reply('ERR hub: the key must not contain { or }')
  end
  return '{' .. key .. '}'
end

local function number_arg(value, name)
  local n = value ~= nil and tonumber(value) or nil
  if n == nil then
    return nil, redis.error_reply('ERR hub: ' .. name .. ' must be a number')
  end
  return n
end

local function fmt(n)
  return string.format('%d', n)
end

local function ms(seconds)
  return math.max(1, math.floor(seconds * 1000 + 0.5))
end

local function new_epoch()
  local t = redis.call('TIME')
  return string.format('%x%06x%06x', tonumber(t[1]), tonumber(t[2]),
                       math.floor(math.random() * 16777216))
end

-- The metadata of the channel, created (new epoch, offset 0, stream dropped) when absent.
-- Returns offset, epoch. Refreshes the metadata's expiry to meta_ms.
local function meta(base, meta_ms)
  local mkey = base .. ':m'
  local got = redis.call('HMGET', mkey, 'o', 'e')
  local offset, epoch = tonumber(got[1]), got[2]
  if offset == nil or not epoch then
    epoch = new_epoch()
    offset = 0
    redis.call('DEL', base .. ':s')
    redis.call('HSET', mkey, 'o', 0, 'e', epoch)
  end
  redis.call('PEXPIRE', mkey, meta_ms)
  return offset, epoch
end

local function meta_ms_of(value, ttl)
  local meta_ttl = DEFAULT_META_TTL
  if value ~= nil and value ~= '' then
    local n, err = number_arg(value, 'meta_ttl')
    if err then return nil, err end
    meta_ttl = n
  end
  return ms(math.max(meta_ttl, ttl))
end

-- FCALL hub_publish 1 K <payload> <size> <ttl> [<idempotency_key> [<meta_ttl>]]
-- -> {offset, epoch}
local function hub_publish(keys, args)
  local base = base_of(keys[1])
  if type(base) == 'table' then return base end
  local payload = args[1]
  if payload == nil then return redis.error_reply('ERR hub: payload missing') end
  local size, err = number_arg(args[2], 'size')
  if err then return err end
  local ttl
  ttl, err = number_arg(args[3], 'ttl')
  if err then return err end
  size = math.floor(size)
  if size < 1 then return redis.error_reply('ERR hub: size must be at least 1') end
  local meta_ms
  meta_ms, err = meta_ms_of(args[5], ttl)
  if err then return err end
  local idem = args[4]
  local ikey = nil
  if idem ~= nil and idem ~= '' then
    ikey = base .. ':i:' .. idem
    local seen = redis.call('GET', ikey)
    if seen then
      local o, e = string.match(seen, '^(%d+):(.+)$')
      return {tonumber(o), e}
    end
  end
  local _, epoch = meta(base, meta_ms)
  local offset = redis.call('HINCRBY', base .. ':m', 'o', 1)
  local skey = base .. ':s'
  redis.call('XADD', skey, 'MAXLEN', size, fmt(offset) .. '-0', 'd', payload)
  if ttl > 0 then
    redis.call('PEXPIRE', skey, ms(ttl))
  else
    redis.call('PERSIST', skey)
  end
  if ikey then
    redis.call('SET', ikey, fmt(offset) .. ':' .. epoch, 'EX', IDEMPOTENCY_TTL)
  end
  local message = fmt(offset) .. ':' .. epoch .. ':' .. payload
  if is_cluster() then
    redis.call('SPUBLISH', base .. ':h', message)
  else
    redis.call('PUBLISH', base .. ':h', message)
  end
  return {offset, epoch}
end

-- FCALL hub_position 1 K <ttl> [<meta_ttl>] -> {offset, epoch} (creates the epoch)
local function hub_position(keys, args)
  local base = base_of(keys[1])
  if type(base) == 'table' then return base end
  local ttl, err = number_arg(args[1] or '0', 'ttl')
  if err then return err end
  local meta_ms
  meta_ms, err = meta_ms_of(args[2], ttl)
  if err then return err end
  local offset, epoch = meta(base, meta_ms)
  return {offset, epoch}
end

-- FCALL hub_new_epoch 1 K <expected_epoch> <ttl> [<meta_ttl>] -> {offset, epoch}
-- Start a new epoch (offset 0, the stream dropped) when the current one is <expected_epoch>:
-- a hub that delivered offsets this epoch no longer holds (Redis came back with fewer
-- messages) retires it, so that reused offsets surface as a new epoch, never as duplicates.
-- Another epoch already: nothing changes (another hub did it first).
local function hub_new_epoch(keys, args)
  local base = base_of(keys[1])
  if type(base) == 'table' then return base end
  local expected = args[1]
  if expected == nil or expected == '' then
    return redis.error_reply('ERR hub: expected epoch missing')
  end
  local ttl, err = number_arg(args[2] or '0', 'ttl')
  if err then return err end
  local meta_ms
  meta_ms, err = meta_ms_of(args[3], ttl)
  if err then return err end
  local current = redis.call('HGET', base .. ':m', 'e')
  if current == expected then
    redis.call('DEL', base .. ':m')
  end
  local offset, epoch = meta(base, meta_ms)
  return {offset, epoch}
end

local function flatten(entries, out)
  for _, entry in ipairs(entries) do
    local id, fields = entry[1], entry[2]
    local payload = ''
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then payload = fields[i + 1] end
    end
    out[#out + 1] = tonumber(string.match(id, '^(%d+)-'))
    out[#out + 1] = payload
  end
end

-- FCALL hub_read 1 K <since_offset> <since_epoch> <limit> <ttl> [<meta_ttl>]
--   since_offset '' (or since_epoch ''): no since
-- -> {offset, epoch, complete 0|1, offset1, payload1, offset2, payload2, ...} oldest first
local function hub_read(keys, args)
  local base = base_of(keys[1])
  if type(base) == 'table' then return base end
  local limit, err = number_arg(args[3], 'limit')
  if err then return err end
  limit = math.floor(limit)
  if limit < 0 then return redis.error_reply('ERR hub: limit must be at least 0') end
  local ttl
  ttl, err = number_arg(args[4] or '0', 'ttl')
  if err then return err end
  local meta_ms
  meta_ms, err = meta_ms_of(args[5], ttl)
  if err then return err end
  local top, epoch = meta(base, meta_ms)
  local skey = base .. ':s'
  local since = nil
  if args[1] ~= nil and args[1] ~= '' and args[2] ~= nil and args[2] ~= '' then
    since = tonumber(args[1])
    if since == nil or since < 0 then
      return redis.error_reply('ERR hub: since_offset must be an offset')
    end
    since = math.floor(since)
  end
  local out = {top, epoch, 0}
  if since ~= nil and args[2] == epoch and since <= top then
    if since == top then
      out[3] = 1
      return out
    end
    local entries = redis.call('XRANGE', skey, fmt(since + 1) .. '-0', '+', 'COUNT',
                               math.max(limit, 1))
    if #entries > 0 and entries[1][1] == fmt(since + 1) .. '-0' then out[3] = 1 end
    if limit > 0 then flatten(entries, out) end
    return out
  end
  if limit > 0 then
    local entries = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', limit)
    local ordered = {}
    for i = #entries, 1, -1 do ordered[#ordered + 1] = entries[i] end
    flatten(ordered, out)
  end
  return out
end

-- Presence ----------------------------------------------------------------------------------
--
-- Per channel (declared key K = <prefix><channel>, hash tag {K}):
--   {K}:p    hash: client id -> packed client info (a JSON object, docs/presence-format.md)
--   {K}:pz   sorted set: client id -> expiry, Redis TIME in milliseconds
-- both expire PRESENCE_LINGER after the channel's latest entry expiry (a backstop only).
-- The caller's index key IDX (declared second, in K's slot: docs/presence-format.md) is a
-- sorted set K -> the earliest expiry of K's entries, kept exact by every writing function,
-- so that a sweep finds every channel that may hold expired entries (hub_presence_due).
-- An entry is live while its expiry > now and expired from expiry <= now.

local PRESENCE_LINGER_MS = 300000
local CHUNK = 1000  -- ids per HMGET (Lua's unpack has a stack limit)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function presence_keys(keys)
  local base = base_of(keys[1])
  if type(base) == 'table' then return nil, base end
  return base .. ':p', base .. ':pz'
end

local function index_of(keys)
  local idx = keys[2]
  if idx == nil or idx == '' then
    return nil, redis.error_reply('ERR hub: the index key (second key) is missing')
  end
  return idx
end

-- the index entry of K and the keys' backstop expiry, after a change
local function reindex(key, pkey, zkey, idx, now)
  local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('DEL', pkey, zkey)
    redis.call('ZREM', idx, key)
    return
  end
  redis.call('ZADD', idx, first[2], key)
  local last = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  local live = math.max(1, tonumber(last[2]) - now) + PRESENCE_LINGER_MS
  redis.call('PEXPIRE', pkey, live)
  redis.call('PEXPIRE', zkey, live)
end

local function infos(pkey, ids, out, with_ids)
  for i = 1, #ids, CHUNK do
    local part = {}
    for j = i, math.min(i + CHUNK - 1, #ids) do part[#part + 1] = ids[j] end
    local got = redis.call('HMGET', pkey, unpack(part))
    for j = 1, #part do
      if with_ids then out[#out + 1] = part[j] end
      out[#out + 1] = got[j] or '{}'
    end
  end
  return out
end

-- FCALL hub_presence_add 2 K IDX <ttl> <client> <info> [<client> <info> ...]
-- -> {created 0|1, ...} one per pair (1: the entry was absent, an expired one counts as
--    present: it is refreshed)
local function hub_presence_add(keys, args)
  local pkey, zkey = presence_keys(keys)
  if pkey == nil then return zkey end
  local idx, err = index_of(keys)
  if err then return err end
  local ttl
  ttl, err = number_arg(args[1], 'ttl')
  if err then return err end
  if ttl <= 0 then return redis.error_reply('ERR hub: ttl must be positive') end
  if #args < 3 or #args % 2 ~= 1 then
    return redis.error_reply('ERR hub: expected <ttl> followed by <client> <info> pairs')
  end
  local now = now_ms()
  local expiry = fmt(now + ms(ttl))
  local out = {}
  for i = 2, #args, 2 do
    out[#out + 1] = redis.call('HSET', pkey, args[i], args[i + 1])
    redis.call('ZADD', zkey, expiry, args[i])
  end
  reindex(keys[1], pkey, zkey, idx, now)
  return out
end

-- FCALL hub_presence_refresh <n+1> IDX K1 ... Kn <ttl> <count1> ... <countn>
--       <client> <info> ... (count1 pairs for K1, then count2 pairs for K2, ...)
-- -> {created 0|1, ...} one per pair, in order: hub_presence_add of many channels that share
--    the index key IDX (so, in a Redis Cluster, one slot) in one call
local function hub_presence_refresh(keys, args)
  local idx = keys[1]
  local n = #keys - 1
  if n < 1 then return redis.error_reply('ERR hub: expected IDX and channel keys') end
  local ttl, err = number_arg(args[1], 'ttl')
  if err then return err end
  if ttl <= 0 then return redis.error_reply('ERR hub: ttl must be positive') end
  local total = 0
  for k = 1, n do
    local count
    count, err = number_arg(args[1 + k], 'count')
    if err then return err end
    total = total + count
  end
  if #args ~= 1 + n + 2 * total then
    return redis.error_reply('ERR hub: the counts do not match the <client> <info> pairs')
  end
  for k = 2, #keys do
    local pkey, e = presence_keys({keys[k]})
    if pkey == nil then return e end
  end
  local now = now_ms()
  local expiry = fmt(now + ms(ttl))
  local out = {}
  local at = 2 + n
  for k = 1, n do
    local key = keys[1 + k]
    local pkey, zkey = presence_keys({key})
    for _ = 1, tonumber(args[1 + k]) do
      out[#out + 1] = redis.call('HSET', pkey, args[at], args[at + 1])
      redis.call('ZADD', zkey, expiry, args[at])
      at = at + 2
    end
    reindex(key, pkey, zkey, idx, now)
  end
  return out
end

-- FCALL hub_presence_remove 2 K IDX <client> -> 1 when this call deleted the entry, else 0
local function hub_presence_remove(keys, args)
  local pkey, zkey = presence_keys(keys)
  if pkey == nil then return zkey end
  local idx, err = index_of(keys)
  if err then return err end
  if args[1] == nil then return redis.error_reply('ERR hub: client missing') end
  local removed = redis.call('ZREM', zkey, args[1])
  redis.call('HDEL', pkey, args[1])
  reindex(keys[1], pkey, zkey, idx, now_ms())
  return removed
end

-- FCALL hub_presence_expire 2 K IDX <limit>
-- -> {client1, info1, ...}: the entries with expiry <= now (at most <limit>, the earliest
--    first), deleted by this call, so no other call returns them
local function hub_presence_expire(keys, args)
  local pkey, zkey = presence_keys(keys)
  if pkey == nil then return zkey end
  local idx, err = index_of(keys)
  if err then return err end
  local limit
  limit, err = number_arg(args[1] or '1000', 'limit')
  if err then return err end
  limit = math.max(1, math.floor(limit))
  local now = now_ms()
  local ids = redis.call('ZRANGE', zkey, '-inf', fmt(now), 'BYSCORE', 'LIMIT', 0, limit)
  local out = {}
  if #ids > 0 then
    infos(pkey, ids, out, true)
    for i = 1, #ids, CHUNK do
      local part = {}
      for j = i, math.min(i + CHUNK - 1, #ids) do part[#part + 1] = ids[j] end
      redis.call('ZREM', zkey, unpack(part))
      redis.call('HDEL', pkey, unpack(part))
    end
  end
  reindex(keys[1], pkey, zkey, idx, now)
  return out
end

local function live_ids(zkey)
  return redis.call('ZRANGE', zkey, '(' .. fmt(now_ms()), '+inf', 'BYSCORE')
end

-- FCALL_RO hub_presence_clients 1 K -> {client1, info1, ...} the live entries only
local function hub_presence_clients(keys)
  local pkey, zkey = presence_keys(keys)
  if pkey == nil then return zkey end
  return infos(pkey, live_ids(zkey), {}, true)
end

-- FCALL_RO hub_presence_stats 1 K -> {clients, users}: live entries, distinct users among
-- them (an entry without a string "user" counts as a client only)
local function hub_presence_stats(keys)
  local pkey, zkey = presence_keys(keys)
  if pkey == nil then return zkey end
  local ids = live_ids(zkey)
  local packed = infos(pkey, ids, {}, false)
  local users, count = {}, 0
  for _, info in ipairs(packed) do
    local ok, decoded = pcall(cjson.decode, info)
    if ok and type(decoded) == 'table' and type(decoded.user) == 'string' then
      if not users[decoded.user] then
        users[decoded.user] = true
        count = count + 1
      end
    end
  end
  return {#ids, count}
end

-- FCALL_RO hub_presence_due 1 IDX <limit> -> {K1, expiry1, K2, expiry2, ...}: the channel
-- keys whose earliest expiry (ms, Redis TIME) <= now, at most <limit>, the most overdue first
local function hub_presence_due(keys, args)
  local limit, err = number_arg(args[1] or '1000', 'limit')
  if err then return err end
  limit = math.max(1, math.floor(limit))
  local got = redis.call('ZRANGE', keys[1], '-inf', fmt(now_ms()), 'BYSCORE', 'LIMIT', 0, limit,
                         'WITHSCORES')
  for i = 2, #got, 2 do got[i] = tonumber(got[i]) end
  return got
end

redis.register_function('hub_presence_add', hub_presence_add)
redis.register_function('hub_presence_refresh', hub_presence_refresh)
redis.register_function('hub_presence_remove', hub_presence_remove)
redis.register_function('hub_presence_expire', hub_presence_expire)
redis.register_function{function_name = 'hub_presence_clients',
                        callback = hub_presence_clients, flags = {'no-writes'}}
redis.register_function{function_name = 'hub_presence_stats',
                        callback = hub_presence_stats, flags = {'no-writes'}}
redis.register_function{function_name = 'hub_presence_due',
                        callback = hub_presence_due, flags = {'no-writes'}}

redis.register_function('hub_version', function() return VERSION end)
redis.register_function('hub_publish', hub_publish)
redis.register_function('hub_position', hub_position)
redis.register_function('hub_new_epoch', hub_new_epoch)
redis.register_function('hub_read', hub_read)
