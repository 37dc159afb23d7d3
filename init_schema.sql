-- WireTAP Server: PostgreSQL schema for CAN frame ingest.
--
-- The table is the one existing WireTAP / CANdor databases already have, so they keep working.
-- Idempotent: run it as often as you like with
--   psql -v ON_ERROR_STOP=1 -d <database> -f init_schema.sql

-- A new database gets the partitioned layout: one partition per day (by default) of frame
-- time, each with a BRIN index on ts and two btrees, plus a DEFAULT partition for frames whose
-- time falls outside every partition (a logger with no clock). "create table if not exists"
-- leaves an existing table alone: the plain public.can_frame of the original tool (and of this
-- project's first release) keeps working as it is; scripts/migrate-partitions.py moves it over.
create table if not exists public.can_frame (
    row_id     bigserial,
    ts         timestamptz not null,
    ingest_ts  timestamptz not null default now(),
    id         integer not null,
    id_hex     text generated always as (
                   upper(lpad(to_hex(id), case when extended then 8 else 3 end, '0'))
               ) stored,
    extended   boolean not null,
    dlc        smallint not null check (dlc between 0 and 64),
    is_fd      boolean not null,
    data_bytes bytea not null,
    data_hex   text generated always as (upper(encode(data_bytes, 'hex'))) stored,
    bus        integer not null default 0,
    dir        text not null default 'rx' check (dir in ('rx', 'tx')),
    -- The server that stored the row. wiretap-server sets wiretap.node on its connection, so
    -- its writer sends the same columns to either layout; another writer (an older tool, psql)
    -- that does not gets its role name.
    node       text not null default
                   coalesce(nullif(current_setting('wiretap.node', true), ''), session_user),
    constraint can_frame_data_length_check check (octet_length(data_bytes) = dlc)
) partition by range (ts);

-- What is on which bus of which node, per hour: kept by every statement that inserts into the
-- partitioned can_frame (trigger below), so "what is on this bus" never reads raw frames.
create table if not exists public.can_inventory (
    hour     timestamptz not null,
    node     text not null,
    bus      integer not null,
    extended boolean not null,
    id       integer not null,
    frames   bigint not null,
    first_ts timestamptz not null,
    last_ts  timestamptz not null,
    primary key (hour, node, bus, extended, id)
);

-- The start of the hour of ts, in UTC whatever the session's time zone.
create or replace function public.can_hour(ts timestamptz)
returns timestamptz
language sql immutable parallel safe
as $$
    select date_bin('1 hour', ts, timestamptz '2000-01-01 00:00:00+00')
$$;

-- One upsert per (hour, node, bus, id) of a statement's new rows. Sorted by the key, so two
-- servers adding to the same rows take their locks in the same order and never deadlock.
-- SECURITY DEFINER: a role that may only insert frames keeps the inventory all the same.
create or replace function public.can_inventory_add()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
begin
    insert into public.can_inventory as inv
        (hour, node, bus, extended, id, frames, first_ts, last_ts)
    select public.can_hour(ts), node, bus, extended, id, count(*), min(ts), max(ts)
    from new_frames
    group by 1, 2, 3, 4, 5
    order by 1, 2, 3, 4, 5
    on conflict (hour, node, bus, extended, id) do update set
        frames = inv.frames + excluded.frames,
        first_ts = least(inv.first_ts, excluded.first_ts),
        last_ts = greatest(inv.last_ts, excluded.last_ts);
    return null;
end
$$;

-- Partitions of the partitioned can_frame with their bounds (lo, hi null for the default).
create or replace function public.can_frame_partitions()
returns table (partition regclass, lo timestamptz, hi timestamptz)
language sql stable
as $$
    select c.oid::regclass,
           substring(pg_get_expr(c.relpartbound, c.oid) from $re$FROM \('([^']+)'\)$re$)
               ::timestamptz,
           substring(pg_get_expr(c.relpartbound, c.oid) from $re$TO \('([^']+)'\)$re$)
               ::timestamptz
    from pg_inherits i
    join pg_class c on c.oid = i.inhrelid
    where i.inhparent = 'public.can_frame'::regclass
    order by 2 nulls first
$$;

-- Partition upkeep, run by every wiretap-server at start and then once an hour (one server
-- at a time does the work; the others return at once). Creates partitions of _interval
-- (aligned to 2000-01-01 UTC) from the one before now to _ahead ahead, so a write never waits
-- for one at midnight, and for rows in the DEFAULT partition from the last _backfill (a spool
-- drained after a long outage): those rows move out of DEFAULT into their new partition.
-- Returns one row per partition made, with the rows it took over from DEFAULT. _from (for
-- scripts/migrate-partitions.py, and only for the table's owner) makes every partition from
-- _from on as well.
-- SECURITY DEFINER: it runs with the rights of whoever ran this script, so servers that may
-- only INSERT can still keep partitions ahead. It can only add partitions. Locks wait at most
-- 2 s (writers queue behind a waiting ALTER); what could not be done is done next time, which
-- is why partitions are made well ahead.
create or replace function public.can_frame_create_partitions(
    _interval interval default '1 day',
    _ahead interval default '2 days',
    _backfill interval default '31 days',
    _from timestamptz default null
)
returns table (partition text, rows bigint)
language plpgsql
security definer
set search_path = pg_catalog, public
as $$
declare
    _origin constant timestamptz := timestamptz '2000-01-01 00:00:00+00';
    _now constant timestamptz := now();
    _lo timestamptz;
begin
    if (select relkind from pg_class where oid = 'public.can_frame'::regclass) <> 'p' then
        return;
    end if;
    if _interval < interval '1 hour' or _ahead > interval '31 days'
            or _backfill > interval '366 days' then
        raise exception 'can_frame_create_partitions: _interval must be at least 1 hour, _ahead'
            ' at most 31 days, _backfill at most 366 days'
            using errcode = 'invalid_parameter_value';
    end if;
    if _from is not null and not pg_has_role(session_user,
            (select relowner from pg_class where oid = 'public.can_frame'::regclass), 'usage') then
        raise exception 'can_frame_create_partitions: only the owner of can_frame may give _from'
            using errcode = 'insufficient_privilege';
    end if;
    if not pg_try_advisory_xact_lock(hashtext('wiretap.can_frame partitions')) then
        return;
    end if;
    perform set_config('lock_timeout', '2s', true);
    for _lo in
        select generate_series(date_bin(_interval, least(_from, _now - _interval), _origin),
                               date_bin(_interval, _now + _ahead, _origin), _interval)
        union
        select distinct date_bin(_interval, d.ts, _origin)
        from public.can_frame_default d
        where d.ts >= _now - _backfill and d.ts < _now + _ahead
        order by 1
    loop
        continue when exists (
            select 1 from public.can_frame_partitions() p
            where p.lo < _lo + _interval and p.hi > _lo);
        partition := 'can_frame_' || to_char(_lo at time zone 'UTC',
            case when _interval >= interval '1 day' and date_bin('1 day', _lo, _origin) = _lo
                 then 'YYYYMMDD' else 'YYYYMMDD"_"HH24MI' end);
        execute format(
            'create table public.%I (like public.can_frame including defaults'
            ' including generated including constraints including storage)', partition);
        execute format(
            'with moved as (delete from public.can_frame_default where ts >= %L and ts < %L'
            ' returning row_id, ts, ingest_ts, id, extended, dlc, is_fd, data_bytes, bus, dir,'
            ' node) insert into public.%I (row_id, ts, ingest_ts, id, extended, dlc, is_fd,'
            ' data_bytes, bus, dir, node) select * from moved',
            _lo, _lo + _interval, partition);
        get diagnostics rows = row_count;
        execute format(
            'alter table public.can_frame attach partition public.%I for values from (%L) to (%L)',
            partition, _lo, _lo + _interval);
        return next;
    end loop;
end
$$;

-- Rows of one node in the DEFAULT partition: frames whose time fell outside every partition.
-- SECURITY DEFINER so that a server that may only insert can report it in its stats.
create or replace function public.can_frame_outside(_node text)
returns bigint
language plpgsql stable
security definer
set search_path = pg_catalog, public
as $$
begin
    return (select count(*) from public.can_frame_default where node = _node);
end
$$;

-- Retention: drops whole partitions that end before now() - _retention (never a DELETE over
-- their rows), and their hours of the inventory. Returns each partition dropped with its row
-- count, taken from the inventory so that nothing reads the partition. Runs with the caller's
-- rights: only the table's owner may drop history, not a role that may only insert.
create or replace function public.can_frame_drop_partitions(_retention interval)
returns table (partition text, rows bigint)
language plpgsql
as $$
declare
    _part record;
begin
    if (select relkind from pg_class where oid = 'public.can_frame'::regclass) <> 'p' then
        return;
    end if;
    if not pg_try_advisory_xact_lock(hashtext('wiretap.can_frame partitions')) then
        return;
    end if;
    perform set_config('lock_timeout', '2s', true);
    for _part in
        select p.partition, p.lo, p.hi from public.can_frame_partitions() p
        where p.hi <= now() - _retention
    loop
        partition := _part.partition::text;
        select coalesce(sum(i.frames), 0) into rows from public.can_inventory i
        where i.hour >= _part.lo and i.hour < _part.hi;
        execute format('drop table %s', partition);
        delete from public.can_inventory i where i.hour >= _part.lo and i.hour < _part.hi;
        return next;
    end loop;
end
$$;

do $$
begin
    if (select relkind from pg_class where oid = 'public.can_frame'::regclass) = 'p' then
        -- BRIN: a few pages per partition, right for append-only rows in time order; serves
        -- every time-window query. The btrees serve "one ID of one node" and "one bus of one
        -- node" over a time window (docs/postgres.md measures what each costs on ingest).
        create table if not exists public.can_frame_default partition of public.can_frame default;
        create index if not exists can_frame_ts_brin on public.can_frame using brin (ts);
        create index if not exists can_frame_node_id_ts_idx on public.can_frame (node, id, ts);
        create index if not exists can_frame_node_bus_ts_idx on public.can_frame (node, bus, ts);
        if not exists (select 1 from pg_trigger where tgname = 'can_frame_inventory'
                       and tgrelid = 'public.can_frame'::regclass) then
            create trigger can_frame_inventory
                after insert on public.can_frame
                referencing new table as new_frames
                for each statement execute function public.can_inventory_add();
        end if;
        perform public.can_frame_create_partitions();
    else
        -- The plain table, as it always was: these three indexes serve "latest frames",
        -- "one ID over time" and "one bus over time".
        create index if not exists can_frame_ts_idx on public.can_frame (ts desc);
        create index if not exists can_frame_id_ts_idx on public.can_frame (id, ts desc);
        create index if not exists can_frame_bus_ts_idx on public.can_frame (bus, ts desc);
    end if;
end
$$;

-- Byte i (0-based) of a payload, or null when the payload is shorter (or null).
create or replace function public.can_byte(payload bytea, i integer)
returns integer
language sql immutable parallel safe
as $$
    select case when i < octet_length(payload) then get_byte(payload, i) end
$$;

create or replace view public.can_frame_bytes as
select
    row_id, ts, id, id_hex, extended, dlc, is_fd, bus, dir,
    public.can_byte(data_bytes, 0) as b0,
    public.can_byte(data_bytes, 1) as b1,
    public.can_byte(data_bytes, 2) as b2,
    public.can_byte(data_bytes, 3) as b3,
    public.can_byte(data_bytes, 4) as b4,
    public.can_byte(data_bytes, 5) as b5,
    public.can_byte(data_bytes, 6) as b6,
    public.can_byte(data_bytes, 7) as b7
from public.can_frame;

create or replace view public.can_fd_frame_bytes as
select
    row_id, ts, id, id_hex, extended, dlc, is_fd, bus, dir,
    public.can_byte(data_bytes, 0) as b0,
    public.can_byte(data_bytes, 1) as b1,
    public.can_byte(data_bytes, 2) as b2,
    public.can_byte(data_bytes, 3) as b3,
    public.can_byte(data_bytes, 4) as b4,
    public.can_byte(data_bytes, 5) as b5,
    public.can_byte(data_bytes, 6) as b6,
    public.can_byte(data_bytes, 7) as b7,
    public.can_byte(data_bytes, 8) as b8,
    public.can_byte(data_bytes, 9) as b9,
    public.can_byte(data_bytes, 10) as b10,
    public.can_byte(data_bytes, 11) as b11,
    public.can_byte(data_bytes, 12) as b12,
    public.can_byte(data_bytes, 13) as b13,
    public.can_byte(data_bytes, 14) as b14,
    public.can_byte(data_bytes, 15) as b15,
    public.can_byte(data_bytes, 16) as b16,
    public.can_byte(data_bytes, 17) as b17,
    public.can_byte(data_bytes, 18) as b18,
    public.can_byte(data_bytes, 19) as b19,
    public.can_byte(data_bytes, 20) as b20,
    public.can_byte(data_bytes, 21) as b21,
    public.can_byte(data_bytes, 22) as b22,
    public.can_byte(data_bytes, 23) as b23,
    public.can_byte(data_bytes, 24) as b24,
    public.can_byte(data_bytes, 25) as b25,
    public.can_byte(data_bytes, 26) as b26,
    public.can_byte(data_bytes, 27) as b27,
    public.can_byte(data_bytes, 28) as b28,
    public.can_byte(data_bytes, 29) as b29,
    public.can_byte(data_bytes, 30) as b30,
    public.can_byte(data_bytes, 31) as b31,
    public.can_byte(data_bytes, 32) as b32,
    public.can_byte(data_bytes, 33) as b33,
    public.can_byte(data_bytes, 34) as b34,
    public.can_byte(data_bytes, 35) as b35,
    public.can_byte(data_bytes, 36) as b36,
    public.can_byte(data_bytes, 37) as b37,
    public.can_byte(data_bytes, 38) as b38,
    public.can_byte(data_bytes, 39) as b39,
    public.can_byte(data_bytes, 40) as b40,
    public.can_byte(data_bytes, 41) as b41,
    public.can_byte(data_bytes, 42) as b42,
    public.can_byte(data_bytes, 43) as b43,
    public.can_byte(data_bytes, 44) as b44,
    public.can_byte(data_bytes, 45) as b45,
    public.can_byte(data_bytes, 46) as b46,
    public.can_byte(data_bytes, 47) as b47,
    public.can_byte(data_bytes, 48) as b48,
    public.can_byte(data_bytes, 49) as b49,
    public.can_byte(data_bytes, 50) as b50,
    public.can_byte(data_bytes, 51) as b51,
    public.can_byte(data_bytes, 52) as b52,
    public.can_byte(data_bytes, 53) as b53,
    public.can_byte(data_bytes, 54) as b54,
    public.can_byte(data_bytes, 55) as b55,
    public.can_byte(data_bytes, 56) as b56,
    public.can_byte(data_bytes, 57) as b57,
    public.can_byte(data_bytes, 58) as b58,
    public.can_byte(data_bytes, 59) as b59,
    public.can_byte(data_bytes, 60) as b60,
    public.can_byte(data_bytes, 61) as b61,
    public.can_byte(data_bytes, 62) as b62,
    public.can_byte(data_bytes, 63) as b63
from public.can_frame
where is_fd;

-- One frame in, its row_id out. Give exactly one of _id / _id_hex; _dlc defaults to the payload
-- length. A DBA may replace this (or point wiretap-server --pg-func at another function with the
-- same parameters) to decode, route or deduplicate frames.
create or replace function public.ingest_can_frame(
    _ts timestamptz,
    _extended boolean,
    _is_fd boolean,
    _id integer default null,
    _id_hex text default null,
    _dlc smallint default null,
    _data_bytes bytea default null,
    _bus integer default 0,
    _dir text default 'rx'
)
returns bigint
language plpgsql
as $$
declare
    _payload bytea := coalesce(_data_bytes, '\x'::bytea);
    _row_id bigint;
begin
    if (_id is null) = (_id_hex is null) then
        raise exception 'ingest_can_frame: give exactly one of _id and _id_hex'
            using errcode = 'invalid_parameter_value';
    end if;
    insert into public.can_frame (ts, id, extended, dlc, is_fd, data_bytes, bus, dir)
    values (
        _ts,
        coalesce(_id, ('x' || lpad(_id_hex, 8, '0'))::bit(32)::integer),
        _extended,
        coalesce(_dlc, octet_length(_payload)),
        _is_fd,
        _payload,
        coalesce(_bus, 0),
        coalesce(_dir, 'rx')
    )
    returning row_id into _row_id;
    return _row_id;
end
$$;

revoke execute on function
    public.can_frame_create_partitions(interval, interval, interval, timestamptz) from public;

-- The ingest role of the original set-up guide is "candor"; grant to it (or to "wiretap") only
-- where such a role exists, so the script also runs on a bare database.
do $$
declare
    _role text;
begin
    foreach _role in array array['candor', 'wiretap'] loop
        if exists (select 1 from pg_roles where rolname = _role) then
            execute format('grant usage on schema public to %I', _role);
            execute format('grant select, insert on public.can_frame to %I', _role);
            execute format('grant usage on sequence public.can_frame_row_id_seq to %I', _role);
            execute format(
                'grant select on public.can_frame_bytes, public.can_fd_frame_bytes to %I', _role);
            execute format('grant execute on function public.can_byte(bytea, integer), '
                'public.ingest_can_frame(timestamptz, boolean, boolean, integer, text, smallint, '
                'bytea, integer, text) to %I', _role);
            execute format('grant select on public.can_inventory to %I', _role);
            execute format('grant execute on function public.can_frame_partitions(), '
                'public.can_frame_outside(text), '
                'public.can_frame_create_partitions(interval, interval, interval, timestamptz)'
                ' to %I', _role);
        end if;
    end loop;
end
$$;
