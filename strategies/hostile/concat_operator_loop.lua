-- The .. operator on long strings: one VM instruction copies megabytes.
return { plan = function(ctx)
    local a = string.rep('x', 1 << 20)
    while true do
        local b = a .. a
    end
end }
