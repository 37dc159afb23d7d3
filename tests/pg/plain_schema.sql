-- The first release's schema: a plain public.can_frame, as existing WireTAP / CANdor databases
-- have it. The tests use it to check that such a database keeps working and that
-- scripts/migrate-partitions.py moves it to the partitioned layout.
--
--   psql -v ON_ERROR_STOP=1 -d <database> -f init_schema.sql

create table if not exists public.can_frame (
    row_id     bigserial primary key,
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
    constraint can_frame_data_length_check check (octet_length(data_bytes) = dlc)
);

-- Every index slows ingest down; these three serve "latest frames", "one ID over time" and
-- "one bus over time".
create index if not exists can_frame_ts_idx on public.can_frame (ts desc);
create index if not exists can_frame_id_ts_idx on public.can_frame (id, ts desc);
create index if not exists can_frame_bus_ts_idx on public.can_frame (bus, ts desc);

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
        end if;
    end loop;
end
$$;
