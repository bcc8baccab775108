-- Equality of two distinct long equal strings: one VM instruction compares megabytes.
return { plan = function(ctx)
    local a = string.rep('x', 1 << 21)
    local b = string.rep('x', (1 << 21) - 1) .. 'x'
    local n = 0
    while true do
        if a == b then n = n + 1 end
    end
end }
