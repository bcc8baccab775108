-- Comparing strings made of NUL bytes costs a C library call per byte and allocates nothing: a 4 MiB string
-- compared with itself is one VM instruction that runs for tens of milliseconds, hundreds per hook granule.
return { plan = function(ctx)
    local s = "\0"
    while #s < (4 << 20) do s = s .. s end
    while true do
        if s < s then break end
    end
    return { ports = ctx.ports }
end }
